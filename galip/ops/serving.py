"""The registered model: an MLflow pyfunc that turns prompts into PNG images.

Request: a DataFrame with a string column ``prompt`` (``mlflow models serve``: ``{"dataframe_split":
{"columns": ["prompt"], "data": [["a red circle on the left"]]}, "params": {"seed": 0, "n": 2}}``).
Response: one row per image with ``prompt``, ``index`` (0..n-1) and ``image`` (base64 PNG).

Artifacts (see galip.ops.registry): ``generator`` (NetG weights + the resolved config), ``clip_reference``
(which CLIP G was trained against) and, when that CLIP is a local checkpoint (the demo's trained tiny
CLIP), ``clip_weights``. A random-weight CLIP is recreated from its seed; a pretrained tag (e.g.
``openai``) must be in the serving machine's open_clip cache, and the error says so.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from ..config import SEED_LIMIT
from ..errors import UserError

PROMPT_COLUMN = "prompt"
DEFAULT_PARAMS: dict[str, int] = {"seed": 0, "n": 1}
MAX_IMAGES_PER_REQUEST = 256


def clip_reference(model_cfg, seed: int, weights_file: str | None) -> dict[str, Any]:
    """What the serving side needs to rebuild the frozen CLIP exactly as training had it."""
    return {
        "clip_model": model_cfg.clip_model,
        "clip_pretrained": model_cfg.clip_pretrained,
        "random_weights_seed": seed if not model_cfg.clip_pretrained else None,
        "weights_artifact": weights_file,
    }


def png_base64(image) -> str:
    """[3, H, W] tensor in [-1, 1] -> base64 PNG."""
    from PIL import Image

    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str):
    """base64 PNG -> PIL image (for clients and tests)."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(text)))


class GalipTextToImage(mlflow.pyfunc.PythonModel):
    """prompts -> images with a GALIP generator; CPU unless a GPU is visible."""

    def load_context(self, context) -> None:
        import torch

        from ..train.checkpoint import load_generator

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        reference = json.loads(Path(context.artifacts["clip_reference"]).read_text())
        clip = self._load_clip(reference, context.artifacts.get("clip_weights"), context.artifacts["generator"])
        self.net_g, self.clip, _ = load_generator(context.artifacts["generator"], self.device, clip=clip)

    @staticmethod
    def _load_clip(reference: dict[str, Any], weights: str | None, generator: str):
        """The CLIP G was trained against: from the weights artifact, or None (load_generator then
        recreates a random-weight CLIP from its seed, or loads the pretrained tag)."""
        if not weights:
            return None
        from ..train.checkpoint import load_checkpoint
        from ..model.clip import load_clip
        from ..config import config_from_dict

        model = config_from_dict(load_checkpoint(generator)["config"]).model
        return load_clip(reference["clip_model"], weights, model.feature_blocks, model.prompt_blocks, model.pixel_norm)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        """Images for the prompts; a bad request raises MlflowException(INVALID_PARAMETER_VALUE), which
        the scoring server answers with HTTP 400 and the reason."""
        import pandas as pd

        from ..eval.generate import generate_images

        try:
            prompts, n, seed = self._request(model_input, params)
        except (UserError, ValueError, TypeError) as exc:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        images = generate_images(self.net_g, self.clip, prompts, n=n, seed=seed)
        rows = [
            {"prompt": prompt, "index": j, "image": png_base64(images[i * n + j])}
            for i, prompt in enumerate(prompts)
            for j in range(n)
        ]
        return pd.DataFrame(rows, columns=["prompt", "index", "image"])

    @classmethod
    def _request(cls, model_input, params: dict[str, Any] | None) -> tuple[list[str], int, int]:
        """(prompts, n, seed), checked like `galip generate` checks its options."""
        from ..eval.generate import check_request

        prompts = cls._prompts(model_input)
        p = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        values = {}
        for key in ("n", "seed"):
            if isinstance(p[key], bool) or not isinstance(p[key], (int, float)) or int(p[key]) != p[key]:
                raise UserError(f"param {key}={p[key]!r}: need an integer")
            values[key] = int(p[key])
        if not 0 <= values["seed"] < SEED_LIMIT:  # torch and numpy generators take no more
            raise UserError(f"param seed={values['seed']}: need 0 <= seed < {SEED_LIMIT} (2**32)")
        check_request(prompts, values["n"], MAX_IMAGES_PER_REQUEST, n_name="param n", max_name="the per-request limit")
        return prompts, values["n"], values["seed"]

    @staticmethod
    def _prompts(model_input) -> list[str]:
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            if PROMPT_COLUMN not in model_input.columns:
                raise UserError(f"input needs a string column {PROMPT_COLUMN!r} (got columns {list(model_input.columns)})")
            prompts = model_input[PROMPT_COLUMN].tolist()
        elif isinstance(model_input, (list, tuple)):
            prompts = list(model_input)
        else:
            prompts = [str(model_input)]
        return prompts


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", PROMPT_COLUMN)]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "index"), ColSpec("string", "image")]),
        params=ParamSchema([ParamSpec(k, "long", v) for k, v in DEFAULT_PARAMS.items()]),
    )

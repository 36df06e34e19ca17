"""Frozen open_clip model and the views of it that GALIP needs.

GALIP uses one frozen CLIP three ways: the text tower encodes prompts, the image tower feeds NetD
with patch tokens from a few intermediate blocks, and NetG's mapper pushes its "bridge feature"
through the image tower's blocks with learned prompt tokens. All sizes (width, grid, input size,
depth, embed dim) are read from the loaded model, so any open_clip ViT works.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

log = logging.getLogger("galip.clip")

# The reference's (1, 4, 8) feature blocks and 1..8 prompt blocks, for a 12-block ViT.
_REF_DEPTH = 12
_REF_FEATURE_BLOCKS = (1, 4, 8)
_REF_PROMPT_BLOCKS = tuple(range(1, 9))


class ClipWeightsError(UserError, RuntimeError):
    """CLIP weights could not be found locally; the message says how to stage them."""


class ClipConfigError(UserError, ValueError):
    """model.* settings that do not fit the chosen CLIP: its name, tag, block indices, the image size."""


def register_project_model_configs() -> None:
    """Make the project's own open_clip configs (e.g. ``galip-tiny``) known to open_clip."""
    import open_clip

    path = Path(str(resources.files("galip.model") / "model_configs"))
    if "galip-tiny" not in open_clip.list_models():
        open_clip.add_model_config(path)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def without_random_init_warning():
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" (a root-logger warning) where
    random weights are what was asked for."""
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _is_weights_file(pretrained: str) -> bool:
    return os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _check_clip_source(name: str, pretrained: str) -> None:
    """The model name is open_clip's, and the weights are a file that exists or a tag of that model."""
    import open_clip

    register_project_model_configs()
    if name not in open_clip.list_models():
        raise ClipConfigError(f"model.clip_model={name!r} is not an open_clip model name (see open_clip.list_models())")
    if not pretrained:
        return
    if _is_weights_file(pretrained):
        if not Path(pretrained).is_file():
            raise ClipWeightsError(
                f"model.clip_pretrained={pretrained!r}: no such file. Stage the checkpoint there, or set a "
                "pretrained tag (e.g. 'openai') on a machine whose open_clip/Hugging Face cache has it."
            )
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ClipConfigError(f"model.clip_pretrained={pretrained!r} is not a tag of {name} (known: {tags})")


def _create_open_clip(name: str, pretrained: str) -> nn.Module:
    import open_clip

    _check_clip_source(name, pretrained)
    if not pretrained:
        # open_clip warns "No pretrained weights loaded ... initialized randomly" on the root logger; here that
        # is what was asked for (the demo's CLIP before its own training, a seeded CLIP in tests): say it once, plainly.
        with without_random_init_warning():
            model = open_clip.create_model(name, pretrained=None)
        log.info("CLIP %s: random weights, as asked (no pretrained weights given)", name)
        return model
    if _is_weights_file(pretrained):
        return open_clip.create_model(name, pretrained=pretrained)
    try:
        return open_clip.create_model(name, pretrained=pretrained)
    except Exception as exc:  # offline hub, proxy, missing cache: all end here
        raise ClipWeightsError(
            f"could not load open_clip weights {name}/{pretrained} ({type(exc).__name__}: {exc}). "
            f"On a connected machine run: python -c \"import open_clip; open_clip.create_model('{name}', "
            f"pretrained='{pretrained}')\" to fill the Hugging Face cache (HF_HOME), copy that cache here, "
            "or download the checkpoint file and set model.clip_pretrained=/path/to/file.pt"
        ) from exc


def check_model_config(model_cfg) -> None:
    """Refuse model.* settings that cannot work with the chosen CLIP, from open_clip's config alone
    (no weights are built or read): a run stops here, before it writes anything, instead of failing
    while it builds the networks."""
    import open_clip

    from .models import g_block_plan

    _check_clip_source(model_cfg.clip_model, model_cfg.clip_pretrained)
    vision = (open_clip.get_model_config(model_cfg.clip_model) or {}).get("vision_cfg", {})
    depth, patch, size = vision.get("layers"), vision.get("patch_size"), vision.get("image_size")
    if vision.get("timm_model_name") or not isinstance(depth, int) or not patch:
        raise ClipConfigError(f"model.clip_model={model_cfg.clip_model!r}: {_NOT_VIT}")
    size = size[0] if isinstance(size, (tuple, list)) else size
    check_blocks(depth, model_cfg.feature_blocks, model_cfg.prompt_blocks)
    g_block_plan(size // patch, model_cfg.image_size, model_cfg.ngf)


_NOT_VIT = "GALIP needs an open_clip ViT image tower (model.visual.transformer); got a non-ViT CLIP"


def check_blocks(depth: int, feature_blocks: Sequence[int], prompt_blocks: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The feature and prompt block indices for a ViT of ``depth`` blocks (empty = the reference's, scaled)."""
    feature = tuple(feature_blocks) or _scaled_blocks(_REF_FEATURE_BLOCKS, depth)
    prompt = tuple(prompt_blocks) or _scaled_blocks(_REF_PROMPT_BLOCKS, depth)
    for key, blocks in (("model.feature_blocks", feature), ("model.prompt_blocks", prompt)):
        if len(set(blocks)) != len(blocks) or not all(0 <= b < depth for b in blocks):
            raise ClipConfigError(f"{key}={list(blocks)}: need distinct block indices in [0, {depth - 1}] for this CLIP")
    return feature, prompt


def _scaled_blocks(ref: Sequence[int], depth: int) -> tuple[int, ...]:
    return tuple(dict.fromkeys(min(depth - 1, round(i * depth / _REF_DEPTH)) for i in ref))


def _sequence_first(transformer: nn.Module | None) -> None:
    """Run an open_clip transformer in OpenAI CLIP's [seq, batch, width] layout (open_clip's own
    ``batch_first=False`` mode, set after construction; the weights and the maths are the same).

    In open_clip's default batch-first layout nn.MultiheadAttention transposes its input to
    [seq, batch, width] as a strided view, and a linear layer on that view runs as a batched matmul
    over the sequence with the weight broadcast: on CPU the attention projections of a ViT-B/32
    training step took ~0.6 s that way, against ~0.1 s as plain matmuls on the contiguous tensor
    the reference's layout gives. The batch-first inference fast path goes too, so forward
    passes round exactly as the reference's (float32 included).
    """
    blocks = list(getattr(transformer, "resblocks", []))
    if not blocks or not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks):
        return  # custom attention blocks (batch-first only): left as they are
    transformer.batch_first = False
    for b in blocks:
        b.attn.batch_first = False


@dataclass(frozen=True)
class ClipDims:
    width: int  # image-tower width (token channels)
    grid: int  # patch grid side
    image_size: int  # CLIP input resolution
    depth: int  # number of ViT blocks
    embed_dim: int  # joint embedding size (sentence / image embedding)
    context_length: int


class FrozenCLIP(nn.Module):
    """A frozen open_clip ViT CLIP with GALIP's text, image-feature and mapper entry points."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        feature_blocks: Sequence[int] = (),
        prompt_blocks: Sequence[int] = (),
        pixel_norm: str = "reference",
    ) -> None:
        super().__init__()
        visual = getattr(model, "visual", None)
        if visual is None or not hasattr(visual, "transformer") or not hasattr(visual, "class_embedding"):
            raise ClipConfigError(_NOT_VIT)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dtype: torch.dtype = torch.float32  # weight / compute dtype, see set_precision
        self.pixel_norm = pixel_norm
        size = visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        grid = visual.grid_size
        grid = grid[0] if isinstance(grid, (tuple, list)) else grid
        depth = len(visual.transformer.resblocks)
        self.dims = ClipDims(
            width=visual.transformer.width,
            grid=grid,
            image_size=size,
            depth=depth,
            embed_dim=visual.output_dim,
            context_length=int(getattr(model, "context_length", 77)),
        )
        self.feature_blocks, self.prompt_blocks = check_blocks(depth, feature_blocks, prompt_blocks)
        mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        text_owner = model if hasattr(model, "ln_final") else model.text
        for tower in (visual, text_owner):
            _sequence_first(getattr(tower, "transformer", None))
        self._tokens_out: torch.Tensor | None = None
        text_owner.ln_final.register_forward_hook(self._keep_tokens)

    def train(self, mode: bool = True) -> "FrozenCLIP":
        # Frozen means frozen: dropout/patch-dropout stay off even when a parent calls .train().
        return super().train(False)

    def _keep_tokens(self, _mod: nn.Module, _inp, out: torch.Tensor) -> None:
        self._tokens_out = out

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    # --- precision --------------------------------------------------------------------------
    def set_precision(self, dtype: torch.dtype | None) -> "FrozenCLIP":
        """Cast the frozen weights to ``dtype`` (bf16/fp16) once; None or float32 keeps fp32.

        Autocast re-casts fp32 weights that do not require grad on every op (its cast cache only
        holds leaf tensors that require grad), so a frozen CLIP under autocast pays a full weight
        cast per forward. open_clip's own low-precision conversion casts the matmul/conv weights and
        projections and leaves LayerNorm and embeddings in fp32, as OpenAI CLIP's fp16 load does.
        """
        from open_clip.model import convert_weights_to_lp

        dtype = dtype or torch.float32
        if dtype == self.dtype:
            return self
        if self.dtype != torch.float32:
            raise ValueError(f"CLIP weights are already {self.dtype}; load a fresh CLIP to change precision")
        if dtype != torch.float32:
            convert_weights_to_lp(self.model, dtype=dtype)
        self.dtype = dtype
        return self

    def _compute(self, device: torch.device) -> contextlib.AbstractContextManager:
        # Low-precision weights need autocast around every entry point (LayerNorms stay fp32);
        # inside an enclosing autocast of the same dtype this is a no-op.
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    # --- text -------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sentence embedding (EOT token @ text_projection) [B, E] and token features [B, L, Wt].

        open_clip's own encode_text applies the causal attn_mask and its batch-first layout; the
        token features are taken from ln_final's output on the same pass.
        """
        with self._compute(tokens.device):
            sent = self.model.encode_text(tokens)
        words, self._tokens_out = self._tokens_out, None
        return sent, words

    # --- image ------------------------------------------------------------------------------
    def to_clip_input(self, images: torch.Tensor) -> torch.Tensor:
        """Map generator-range images ([-1, 1]) to CLIP's normalised input at CLIP's resolution.

        ``reference`` reproduces tobran/GALIP exactly: images go to [0, 1], are resized (nearest)
        and then mapped once more by (x + 1) / 2, so pixels reach CLIP's mean/std in [0.5, 1].
        Pretrained GALIP weights expect this. ``standard`` is the usual [0, 1] -> mean/std.
        """
        x = images * 0.5 + 0.5
        size = self.dims.image_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="nearest")
        if self.pixel_norm == "reference":
            x = (x + 1) * 0.5
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens after ``feature_blocks`` as [B, n, W, g, g] and the projected image embedding [B, E]."""
        with self._compute(images.device):
            out = self.visual.forward_intermediates(
                self.to_clip_input(images), indices=list(self.feature_blocks), output_fmt="NCHW"
            )
        return torch.stack(out["image_intermediates"], dim=1), out["image_features"]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with self._compute(images.device):
            return self.visual(self.to_clip_input(images))

    # --- NetG's mapper ----------------------------------------------------------------------
    def map_bridge(self, bridge: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Run a bridge feature [B, W, g, g] through every ViT block (no patch conv).

        Block i in ``prompt_blocks`` sees one extra learned token (prompts[:, k]) appended to the
        sequence and dropped after the block, as in the reference's CLIP_Mapper.
        """
        with self._compute(bridge.device):
            return self._map_bridge(bridge, prompts).to(bridge.dtype)

    def _map_bridge(self, bridge: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        v = self.visual
        b, w, g, _ = bridge.shape
        x = bridge.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, w).expand(b, 1, w)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x)
        seq = 1 if getattr(v.transformer, "batch_first", True) else 0  # the token axis of the blocks' layout
        if seq == 0:
            x, prompts = x.transpose(0, 1), prompts.transpose(0, 1)
        k = 0
        for i, block in enumerate(v.transformer.resblocks):
            prompted = i in self.prompt_blocks
            if prompted:
                x = torch.cat([x, prompts.narrow(seq, k, 1).to(x.dtype)], dim=seq)
                k += 1
            x = block(x)
            if prompted:
                x = x.narrow(seq, 0, x.shape[seq] - 1)
        if seq == 0:
            x = x.transpose(0, 1)
        return x[:, 1:].transpose(1, 2).reshape(b, w, g, g)


def load_clip(
    name: str,
    pretrained: str = "",
    feature_blocks: Sequence[int] = (),
    prompt_blocks: Sequence[int] = (),
    pixel_norm: str = "reference",
) -> FrozenCLIP:
    """Create the frozen CLIP named by ``model.clip_model``/``model.clip_pretrained``."""
    import open_clip

    model = _create_open_clip(name, pretrained)
    return FrozenCLIP(model, open_clip.get_tokenizer(name), feature_blocks, prompt_blocks, pixel_norm)


def clip_from_config(model_cfg) -> FrozenCLIP:
    return load_clip(
        model_cfg.clip_model,
        model_cfg.clip_pretrained,
        model_cfg.feature_blocks,
        model_cfg.prompt_blocks,
        model_cfg.pixel_norm,
    )

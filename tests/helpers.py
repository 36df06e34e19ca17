"""Small real webdataset shards and configs for trainer tests (no network, a few KB each)."""

from __future__ import annotations

import contextlib
import io
import socket
from pathlib import Path

import numpy as np
from PIL import Image

from galip.config import Config, load_config

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def write_shards(
    out_dir: Path, n_samples: int = 48, per_shard: int = 12, size: int = 64, seed: int = 0, unique: bool = False
) -> Path:
    """JPEG + caption samples (a coloured square on the left or right) as tar shards."""
    import webdataset as wds

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    with wds.ShardWriter(str(out_dir / "shard-%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n_samples):
            colour, side = names[rng.integers(len(names))], ("left", "right")[rng.integers(2)]
            img = np.full((size, size, 3), 245, np.uint8)
            x0 = size // 8 if side == "left" else size // 2 + size // 8
            img[size // 3 : size // 3 + size // 3, x0 : x0 + size // 3] = COLOURS[colour]
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            caption = f"a {colour} square on the {side}" + (f", sample {i}" if unique else "")
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": caption})
    return out_dir


@contextlib.contextmanager
def black_hole():
    """A loopback endpoint that accepts connections (the kernel's backlog does) and never answers; yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def tiny_overrides(tmp: Path, shards: Path, *extra: str) -> list[str]:
    """The demo profile shrunk to seconds (batch 4, tiny G/D, no DataLoader workers), as -S overrides."""
    return [
        f"data.shards_dir={shards}",
        "data.workers=0",
        "data.shuffle_buffer=8",
        f"train.out_dir={tmp / 'run'}",
        "train.batch_size=4",
        "train.log_every=1",
        "train.sample_every=2",
        "train.ckpt_every=2",
        "train.keep_checkpoints=10",
        "model.ngf=8",
        "model.ndf=8",
        "model.code_channels=8",
        "model.code_mid_channels=8",
        "model.mapper_blocks=1",
        "train.eval_every=0",  # tests that evaluate during training turn it on
        *extra,
    ]


def assert_bitwise_equal(a, b, where=""):
    """Nested dicts/lists of tensors and plain values are identical, bit for bit."""
    import torch

    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
def tiny_config(tmp: Path, shards: Path, *extra: str) -> Config:
    return load_config("params.yaml", tiny_overrides(tmp, shards, *extra), profile="demo")


def set_args(overrides: list[str]) -> list[str]:
    """-S k=v pairs for the CLI."""
    return [a for o in overrides for a in ("-S", o)]


def eval_clip_checkpoint(path: Path, seed: int = 12345) -> Path:
    """A fixed galip-tiny CLIP saved as a checkpoint file, for eval.eval_clip_pretrained: the metrics of an
    evaluation CLIP with random weights ('') are not computed, a checkpoint's are."""
    import open_clip
    import torch

    from galip.model.clip import register_project_model_configs

    if not path.is_file():
        register_project_model_configs()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = open_clip.create_model("galip-tiny").state_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return path


def run_config_tags(client, run) -> dict[str, str]:
    """The MLflow run's config tags (galip.ops.pipeline_run.config_tags): its tags named as a key of its
    config/resolved.yaml artifact. Each holds that key's value: no record tag overwrote one."""
    import yaml

    from galip.config import flatten

    config = flatten(yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config/resolved.yaml")).read_text()))
    tags = {k: v for k, v in run.data.tags.items() if k in config}
    assert tags == {k: str(config[k])[:6000] for k in tags}, "a config tag holds the config's value"
    return tags

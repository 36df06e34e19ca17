"""Checkpoints: state_dicts + resolved config + step + RNG states + version, written atomically.

Never pickled modules: everything loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import UserError

log = logging.getLogger("galip.checkpoint")

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")
# What an interrupted write leaves behind: save_checkpoint's temp file, storage.download's part file.
_ORPHAN = re.compile(r"^\.ckpt_\d{8}\.pt\.(tmp|part)-\d+$")
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(UserError):
    """A checkpoint file that cannot be used: truncated, corrupt, or of another format."""


def checkpoint_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt_{step:08d}.pt"


def is_checkpoint_name(name: str) -> bool:
    return bool(_NAME.match(name))


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def save_checkpoint(path: str | Path, payload: dict[str, Any], keep: int | None = None, protect: Path | None = None) -> Path:
    """Write atomically, then prune old ones (never ``protect``: the best checkpoint so far)."""
    path = atomic_save({"format_version": FORMAT_VERSION, "galip_version": __version__, **payload}, path)
    if keep:
        for old in [p for p in list_checkpoints(path.parent) if p != protect][:-keep]:
            old.unlink(missing_ok=True)
    return path


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless ``path`` is a complete torch zip whose every record matches its CRC-32.

    torch.load notices a cut-off file but loads a flipped byte without complaint; the zip's own
    checksums catch both, at the cost of reading the file once.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass a checkpoint file (e.g. {path}/ckpt_00000600.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (train first, or pass --checkpoint PATH)")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    # A flipped byte in a member name of the zip directory fails to decode: unreadable like a cut file.
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or not a checkpoint ({exc}; {path.stat().st_size} bytes)") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt (record {bad} fails its checksum)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> dict[str, Any]:
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same: not our checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        found = ckpt.get("format_version") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: checkpoint format {found} is not {FORMAT_VERSION} (not written by galip train?)")
    return ckpt


def training_clip(cfg):
    """The frozen CLIP a run with ``cfg`` trains against.

    A random-weight CLIP (model.clip_pretrained '') is not stored: the trainer creates it right after
    torch.manual_seed(train.seed), so the same seed recreates the very same weights.
    """
    from ..model.clip import clip_from_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return clip_from_config(cfg.model)
def older_checkpoints(path: Path) -> list[Path]:
    """Checkpoints in ``path``'s folder written before it, newest first."""
    if not is_checkpoint_name(path.name):
        return []
    return [p for p in reversed(list_checkpoints(path.parent)) if p.name < path.name]


def readable_checkpoint(path: str | Path) -> Path:
    """``path`` if it verifies; when it is unreadable, the newest good checkpoint written before it in
    the same folder, said in one warning line. Read-only: for generate and evaluate."""
    path = Path(path)
    try:
        verify_checkpoint(path)
        return path
    except CheckpointError as first:
        if not path.is_file():
            raise
        for older in older_checkpoints(path):
            try:
                verify_checkpoint(older)
            except CheckpointError:
                continue
            log.warning("%s; using the previous good one, %s", first, older)
            return older
        raise


def newest_good_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest verifiable checkpoint in ``ckpt_dir``; newer unreadable ones are renamed to
    ``*.corrupt`` (kept for inspection, never picked again), each said in one warning line.
    When there are checkpoints but none is readable, CheckpointError, and nothing is renamed: the
    run must not silently start over from step 0 in a folder that holds a run.
    Only the process that owns the folder (the run lock) may call this."""
    unreadable: list[tuple[Path, CheckpointError]] = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            unreadable.append((path, exc))
            continue
        for bad, exc in unreadable:
            aside = bad.with_name(bad.name + CORRUPT_SUFFIX)
            os.replace(bad, aside)
            log.warning("%s; moved aside to %s, falling back to the previous checkpoint", exc, aside.name)
        return path
    if unreadable:
        raise CheckpointError(
            f"none of the {len(unreadable)} checkpoint(s) in {ckpt_dir} is readable (newest: {unreadable[0][1]}); "
            "nothing was changed. Restore a good copy there, or move them away (or set train.out_dir to a new folder) "
            "to start from step 0"
        )
    return None


def remove_orphans(ckpt_dir: str | Path) -> list[str]:
    """Delete temp files of writes that a kill interrupted (owner of the folder only); their names."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    gone = sorted(p.name for p in d.iterdir() if _ORPHAN.match(p.name))
    for name in gone:
        (d / name).unlink(missing_ok=True)
    if gone:
        log.warning("removed %d temp file(s) of an interrupted checkpoint write in %s: %s", len(gone), d, ", ".join(gone))
    return gone


def load_generator(path: str | Path, device: str | torch.device = "cpu", clip=None):
    """(NetG in eval mode, FrozenCLIP, Config) from a training checkpoint; CLIP comes from the saved config."""
    from ..config import config_from_dict
    from ..model.models import NetG
    from ..model.precision import Precision

    ckpt = load_checkpoint(readable_checkpoint(path), verify=False)
    cfg = config_from_dict(ckpt["config"])
    device = torch.device(device)
    # Inference runs in the device's own precision (bf16 CLIP on GPUs, fp32 on CPU): see generate_images.
    clip = clip if clip is not None else training_clip(cfg)
    clip = clip.set_precision(Precision.resolve("auto", device).dtype).to(device)
    net_g = NetG(cfg.model, clip)
    # The EMA weights are the model; a run trained without EMA has only netG.
    net_g.load_state_dict(ckpt.get("netG_ema", ckpt["netG"]))
    return net_g.to(device).eval(), clip, cfg

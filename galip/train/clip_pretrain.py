"""The clip stage: the CLIP weights every later stage loads, written to ``clip_pretrain.out_path``.

    galip train-clip

With ``clip_pretrain.enabled: false`` (production) the stage writes ``model.clip_pretrained`` (an open_clip
tag such as ``openai``, or a staged local file) there, so DVC (dvc.lock) and MLflow pin the exact weights
and the later stages never reach for the hub. With ``enabled`` (demo) it trains them first:

GALIP trains against a *frozen* CLIP; with random CLIP weights the text signal is too weak for a short
CPU demo, so the demo first fits its tiny CLIP (``model.clip_model: galip-tiny``) to the demo captions.
The result is a plain open_clip state_dict at ``clip_pretrain.out_path``, loadable with
``open_clip.create_model(name, pretrained=out_path)``, i.e. ``-S model.clip_pretrained=<out_path>``.
open_clip_train runs in-process so it sees the project's model configs (registered at import time of
this step, not of the package). After training, the stage measures how well the CLIP separates each
demo attribute (``galip.clip_probe``) and writes it with the timing to ``clip_pretrain.report_path``
(DVC metrics; galip.ops.pipeline_run logs it to the pipeline's MLflow run).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..errors import MissingInputError

log = logging.getLogger("galip.clip_pretrain")


class ClipPretrainError(RuntimeError):
    """open_clip_train did not produce a checkpoint; the message says where its log is."""


def _patch_webdataset_eof() -> None:
    """open_clip_train's tar grouping predates webdataset 0.2.100's end-of-shard ``{}`` markers and
    fails with ``KeyError: 'fname'`` on them; ask the expander not to emit them (same samples otherwise)."""
    import open_clip_train.data as oct_data
    from webdataset import tariterators

    if not isinstance(oct_data.tar_file_expander, functools.partial):
        oct_data.tar_file_expander = functools.partial(tariterators.tar_file_expander, eof_value=None)


def _fused_adamw() -> None:
    """open_clip_train builds torch's default AdamW, on CPU the for-loop one: about ten passes over every
    tensor per step, and the tiny CLIP's 6.3M-entry token table makes that ~15 % of a demo CLIP step
    (bench/results/cpu_clip_step.jsonl). The fused AdamW is the same update in one pass (the last bit of a
    weight can round differently), as the GAN trainer uses it."""
    import types

    import open_clip_train.main as oct_main

    if getattr(oct_main.optim, "_galip_fused", False):
        return
    optim = types.ModuleType(oct_main.optim.__name__)
    optim.__dict__.update(vars(oct_main.optim))
    optim.AdamW = functools.partial(torch.optim.AdamW, fused=True)  # type: ignore[attr-defined]
    optim._galip_fused = True  # type: ignore[attr-defined]
    oct_main.optim = optim


# open_clip_train's console lines worth a run log: progress and results. Its model printout, parameter
# dump and the rest stay in its log file, kept next to the checkpoint.
_CONSOLE_PREFIXES = ("Start epoch", "Train Epoch", "Eval Epoch")


def _progress_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.getMessage().startswith(_CONSOLE_PREFIXES)


def _quiet_console() -> None:
    """Filter the console handler open_clip_train's ``setup_logging`` adds (its file handler keeps everything)."""
    import open_clip_train.main as oct_main

    setup = oct_main.setup_logging
    if getattr(setup, "_galip_quiet", False):
        return

    @functools.wraps(setup)
    def quiet_setup(log_file: str, level: int, include_host: bool = False) -> None:
        before = set(logging.root.handlers)
        # setup_logging also lowers every library logger to INFO (torch then prints compile stats at exit)
        levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
        setup(log_file, level, include_host)
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)
        for handler in set(logging.root.handlers) - before:
            if type(handler) is logging.StreamHandler:
                handler.addFilter(_progress_only)

    quiet_setup._galip_quiet = True  # type: ignore[attr-defined]
    oct_main.setup_logging = quiet_setup


def count_samples(cfg: Config, shards: list[str]) -> int:
    """Samples in the shards, from img2dataset's per-shard stats (no pass over the data)."""
    total = 0
    for shard in shards:
        stats = Path(shard).with_name(Path(shard).stem + "_stats.json")
        if not stats.is_file():
            raise MissingInputError(f"{stats}: missing; train-clip needs shards written by `galip download`")
        total += int(json.loads(stats.read_text())["successes"])
    if total == 0:
        raise MissingInputError(f"the shards in {cfg.data.shards_dir} hold no samples: run `galip download` first")
    return total


def trainer_args(cfg: Config, shards: list[str], num_samples: int, logs: Path, name: str, seed: int) -> list[str]:
    """open_clip_train's command line for this config (CPU-sized in the demo profile)."""
    c = cfg.clip_pretrain
    return [
        "--model", cfg.model.clip_model,
        "--train-data", "::".join(shards),
        "--dataset-type", "webdataset",
        # resampled shards: fewer shards than workers is fine and every epoch has num_samples samples
        "--dataset-resampled",
        "--train-num-samples", str(num_samples),
        "--batch-size", str(c.batch_size),
        "--epochs", str(c.epochs),
        "--lr", str(c.lr),
        "--wd", str(c.wd),
        "--warmup", str(c.warmup),
        "--workers", str(c.workers),
        "--precision", "fp32",
        # Captions state position and size: a random crop or aspect change would contradict them.
        "--aug-cfg", "scale=(1.0,1.0)",  # the full image (at scale 1 the aspect jitter has no room)
        "--seed", str(seed),
        "--logs", str(logs),
        "--name", name,
        "--report-to", "",
        "--log-every-n-steps", "5",
        "--zeroshot-frequency", "0",
        "--save-frequency", "0",  # only the final epoch is saved
        "--delete-previous-checkpoint",
    ]  # fmt: skip


def _final_checkpoint(logs: Path, name: str, epochs: int) -> Path:
    path = logs / name / "checkpoints" / f"epoch_{epochs}.pt"
    if not path.is_file():
        raise ClipPretrainError(f"open_clip_train wrote no {path.name}; see its log at {logs / name / 'out.log'}")
    return path


def _write_state_dict(src: Path, out: Path) -> None:
    """Keep only the model weights (the trainer's checkpoint also holds the optimizer: 3x the size)."""
    state = torch.load(src, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, out)


def measure_separation(cfg: Config, checkpoint: Path) -> dict[str, Any]:
    """How well the trained CLIP separates each demo attribute (``galip.clip_probe``), as GALIP will load it."""
    from ..model.clip import load_clip
    from .clip_probe import attribute_separation

    clip = load_clip(cfg.model.clip_model, str(checkpoint), pixel_norm=cfg.model.pixel_norm)
    c = cfg.clip_pretrain
    return attribute_separation(clip, n=c.separation_samples, seed=c.seed, image_size=cfg.model.image_size)


def report(cfg: Config, result: dict[str, Any]) -> None:
    """The stage's report: ``clip_pretrain.report_path`` (DVC metrics) and, under a flow, MLflow metrics."""
    from .clip_probe import chance, weak_attributes
    from ..eval.evaluate import write_json_atomic

    weak = weak_attributes(result["separation"])
    if weak:
        result["weak_attributes"] = weak
        what = ", ".join(f"{a} {v:.0f} % (chance {chance()[a]:.0f} %)" for a, v in weak.items())
        log.warning(
            "the CLIP in %s barely separates %s on training-like scenes; the generator cannot follow what its CLIP "
            "does not separate. Train it again with another clip_pretrain.seed or more clip_pretrain.epochs "
            "(e.g. dvc exp run -S clip_pretrain.seed=1)", result["checkpoint"], what,
        )
    write_json_atomic(Path(cfg.clip_pretrain.report_path), result)


def _train_once(cfg: Config, shards: list[str], num_samples: int, seed: int, out: Path) -> dict[str, Any]:
    """One open_clip_train run with ``seed``, its weights written to ``out``, then its separation measured."""
    from open_clip_train.main import main as open_clip_train_main

    from ..model.clip import without_random_init_warning

    logs = Path(tempfile.mkdtemp(prefix=".open_clip_train-", dir=out.parent))
    name = f"{cfg.model.clip_model}-{int(time.time())}-seed{seed}"
    t0 = time.perf_counter()
    log.info("training %s from random weights on %d samples from %d shards (%d epochs, seed %d)",
             cfg.model.clip_model, num_samples, len(shards), cfg.clip_pretrain.epochs, seed)  # fmt: skip
    # open_clip_train's setup_logging adds a file and a console handler to the root logger and lowers its
    # level; in a process that goes on (a notebook, the suite) they would outlive the run's log folder.
    root_handlers, root_level = list(logging.root.handlers), logging.root.level
    try:
        with without_random_init_warning():  # a CLIP trained here starts from random weights by design
            try:
                rc = open_clip_train_main(trainer_args(cfg, shards, num_samples, logs, name, seed))
            finally:
                for handler in [h for h in logging.root.handlers if h not in root_handlers]:
                    logging.root.removeHandler(handler)
                    handler.close()
                logging.root.setLevel(root_level)
        if rc not in (None, 0):
            raise ClipPretrainError(f"open_clip_train returned {rc}; see {logs / name / 'out.log'}")
        _write_state_dict(_final_checkpoint(logs, name, cfg.clip_pretrain.epochs), out)
        trainer_log = out.with_name(f"open_clip_train.seed{seed}.log")
        shutil.copyfile(logs / name / "out.log", trainer_log)
        final_log = trainer_log.read_text().strip().splitlines()[-1:]
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    result = {
        "checkpoint": str(out),
        "model": cfg.model.clip_model,
        "samples": num_samples,
        "epochs": cfg.clip_pretrain.epochs,
        "seed": seed,
        "wall_s": round(time.perf_counter() - t0, 1),
        "last_log": final_log[0] if final_log else "",
        "trainer_log": str(trainer_log),
    }
    t1 = time.perf_counter()
    result["separation"] = measure_separation(cfg, out)
    result["separation_s"] = round(time.perf_counter() - t1, 1)
    return result


def export_pretrained(cfg: Config) -> dict[str, Any]:
    """``model.clip_pretrained`` (tag, local file, or '' = seeded random weights) as a state_dict at out_path."""
    import hashlib

    from ..eval.evaluate import write_json_atomic
    from ..model.clip import _create_open_clip

    m, c = cfg.model, cfg.clip_pretrain
    t0 = time.perf_counter()
    torch.manual_seed(c.seed)  # only matters for random weights: the same file on every run
    model = _create_open_clip(m.clip_model, m.clip_pretrained)
    out = Path(c.out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    result = {"enabled": False, "clip_model": m.clip_model, "source": m.clip_pretrained or f"random (seed {c.seed})",
              "checkpoint": str(out), "sha256": digest, "wall_s": round(time.perf_counter() - t0, 1)}
    write_json_atomic(Path(c.report_path), result)
    log.info("CLIP %s/%s written to %s (sha256 %s)", m.clip_model, result["source"], out, digest[:16])
    return result


def run(cfg: Config) -> dict[str, Any]:
    """Train ``model.clip_model`` contrastively on the shards (``clip_pretrain.enabled``), else write the
    pretrained weights (``export_pretrained``); returns the checkpoint path, timing and separation.

    Whether the tiny CLIP learns position within the demo's epochs depends on the seed (and the data
    order): a run that leaves an attribute unseparated (``clip_probe.weak_attributes``) is trained again
    with the next seed, up to ``clip_pretrain.attempts`` runs, and the best one (highest minimum held-in
    separation) is kept.
    """
    from ..model.clip import register_project_model_configs
    from ..data.loader import resolve_shards
    from .clip_probe import weak_attributes

    if not cfg.clip_pretrain.enabled:
        return export_pretrained(cfg)
    register_project_model_configs()
    _patch_webdataset_eof()
    _quiet_console()
    _fused_adamw()
    shards = resolve_shards(cfg.data)
    num_samples = count_samples(cfg, shards)
    c = cfg.clip_pretrain
    out = Path(c.out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tries: list[dict[str, Any]] = []
    for k in range(c.attempts):
        seed = c.seed + k
        candidate = _train_once(cfg, shards, num_samples, seed, out.with_name(f".{out.stem}.seed{seed}{out.suffix}"))
        weak = weak_attributes(candidate["separation"])
        tries.append(candidate | {"weak_attributes": weak})
        if not weak:
            break
        if k + 1 < c.attempts:
            log.warning("CLIP training with seed %d left %s unseparated (held-in image->text %s %%); training again with seed %d",
                        seed, ", ".join(weak), ", ".join(f"{v:.0f}" for v in weak.values()), seed + 1)
    best = max(tries, key=lambda r: r["separation"]["held_in"]["image_text"]["min"])
    os.replace(best["checkpoint"], out)
    shutil.copyfile(best["trainer_log"], out.with_name("open_clip_train.log"))
    for r in tries:
        Path(r["checkpoint"]).unlink(missing_ok=True)
        Path(r["trainer_log"]).unlink(missing_ok=True)
    result = {k: v for k, v in best.items() if k != "weak_attributes"}
    result |= {"checkpoint": str(out), "trainer_log": str(out.with_name("open_clip_train.log")),
               "wall_s": round(time.perf_counter() - t0, 1)}
    result["attempts"] = [{"seed": r["seed"], "wall_s": r["wall_s"], "held_in_image_text": r["separation"]["held_in"]["image_text"]}
                          for r in tries]
    report(cfg, result)
    return result

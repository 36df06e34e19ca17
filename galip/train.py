"""GALIP training: one readable loop, single process or under torchrun (DDP).

    python -m galip.train --profile demo
    torchrun --nproc_per_node=8 -m galip.train --profile cc12m --resume

Each iteration is the reference's two explicit phases: a D phase (hinge on real / fake / mismatched
pairs + MA-GP on the CLIP features and the sentence) and a G phase (adversarial + CLIP similarity).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import losses
from . import storage
from .checkpoint import (
    capture_rng,
    checkpoint_path,
    is_checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .clip import FrozenCLIP, clip_from_config
from .config import Config
from .distributed import DistEnv, barrier, cleanup, init_distributed
from .models import NetC, NetD, NetG, build_nets
from .tracking import Tracker, stage_params

log = logging.getLogger("galip.train")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf; no checkpoint is written for that step."""


@dataclass(frozen=True)
class Precision:
    autocast_dtype: torch.dtype | None  # None: plain fp32
    use_scaler: bool  # fp16 needs loss scaling; bf16 does not

    @staticmethod
    def resolve(name: str, device: torch.device) -> "Precision":
        if name == "auto":
            if device.type == "cuda":
                name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            else:
                name = "fp32"
        if name in ("fp16", "bf16") and device.type != "cuda":
            raise ValueError(f"train.precision={name} needs a CUDA device; on {device.type} use fp32 (or auto)")
        return {
            "fp32": Precision(None, False),
            "bf16": Precision(torch.bfloat16, False),
            "fp16": Precision(torch.float16, True),
        }[name]


def segment_seed(seed: int, rank: int, step: int) -> int:
    # The data stream is rebuilt at every checkpoint boundary from (seed, rank, step): a run resumed
    # from step k then reads exactly the batches the uninterrupted run read after step k.
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**31 - 1)


@dataclass
class Trainer:
    cfg: Config
    env: DistEnv
    clip: FrozenCLIP
    net_g: NetG
    net_d: NetD
    net_c: NetC
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    precision: Precision
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    noise_gen: torch.Generator
    g: nn.Module = field(init=False)  # DDP-wrapped views (or the nets themselves)
    d: nn.Module = field(init=False)
    c: nn.Module = field(init=False)
    step: int = 0

    def __post_init__(self) -> None:
        self.g, self.d, self.c = self.net_g, self.net_d, self.net_c
        if self.env.distributed:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            # NetD keeps the reference's never-applied 1x1 shortcut convs; DDP must not wait for them.
            DDP._set_params_and_buffers_to_ignore_for_model(self.net_d, self.net_d.unused_parameter_names())
            self.g = DDP(self.net_g, device_ids=ids)
            self.d = DDP(self.net_d, device_ids=ids)
            self.c = DDP(self.net_c, device_ids=ids)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: Config, env: DistEnv, clip: FrozenCLIP | None = None) -> "Trainer":
        t = cfg.train
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        clip = (clip or clip_from_config(cfg.model)).to(env.device)
        net_g, net_d, net_c = (m.to(env.device) for m in build_nets(cfg.model, clip))
        if t.channels_last:
            for m in (net_g, net_d, net_c):
                m.to(memory_format=torch.channels_last)
        betas = (t.beta1, t.beta2)
        opt_g = torch.optim.Adam(net_g.parameters(), lr=t.lr_g, betas=betas)
        opt_d = torch.optim.Adam([*net_d.parameters(), *net_c.parameters()], lr=t.lr_d, betas=betas)
        precision = Precision.resolve(t.precision, env.device)
        scaler = lambda: torch.amp.GradScaler(env.device.type, enabled=precision.use_scaler)  # noqa: E731
        noise_gen = torch.Generator(env.device).manual_seed(t.seed + env.rank)
        return cls(cfg, env, clip, net_g, net_d, net_c, opt_g, opt_d, precision, scaler(), scaler(), noise_gen)

    # --- one iteration --------------------------------------------------------------------------
    def autocast(self):
        if self.precision.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.precision.autocast_dtype)

    def _sync(self, last: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
        if last or not self.env.distributed:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in (self.g, self.d, self.c):
            stack.enter_context(m.no_sync())
        return stack

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """One optimiser step of D (+C) and of G over ``grad_accum`` micro-batches of (images, tokens)."""
        t, dev = self.cfg.train, self.env.device
        n = len(micro_batches)
        # With one micro-batch the D phase's fake (and its graph) is reused by the G phase, as in the
        # reference; with accumulation, keeping every micro-batch's graph would defeat the purpose, so
        # the D phase generates without a graph and the G phase regenerates from the same noise.
        keep_graph = n == 1
        stats = {"loss_d": 0.0, "loss_g": 0.0, "d_real": 0.0, "d_fake": 0.0, "d_mis": 0.0, "magp": 0.0, "clip_sim": 0.0}
        saved = []

        # D phase
        self.net_d.requires_grad_(True)
        self.net_c.requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        for i, (real, tokens) in enumerate(micro_batches):
            real = real.to(dev, non_blocking=True)
            tokens = tokens.to(dev, non_blocking=True)
            with torch.no_grad(), self.autocast():
                sent, _ = self.clip.encode_text(tokens)
                real_feats, _ = self.clip.image_features(real)
            # Leaves for MA-GP: gradients w.r.t. the CLIP features and the sentence, never into CLIP.
            sent = sent.float().requires_grad_(True)
            real_feats = real_feats.float().requires_grad_(True)
            noise = torch.randn(real.shape[0], self.cfg.model.nz, device=dev, generator=self.noise_gen)
            with self._sync(i == n - 1):
                with self.autocast():
                    real_out = self.d(real_feats)
                    real_logits = self.c(real_out, sent)
                    mis_logits = self.c(real_out, losses.mismatched(sent).detach())
                    with contextlib.nullcontext() if keep_graph else torch.no_grad():
                        fake = self.g(noise, sent)
                        fake_feats, fake_emb = self.clip.image_features(fake)
                    fake_logits = self.c(self.d(fake_feats.detach()), sent)
                    hinge = losses.d_hinge(real_logits, fake_logits, mis_logits)
                scale = self.scaler_d.get_scale() if self.precision.use_scaler else None
                magp = losses.ma_gp(real_logits.float(), real_feats, sent, t.magp_k, t.magp_p, grad_scale=scale)
                loss_d = hinge.float() + magp
                self.scaler_d.scale(loss_d / n).backward()
            saved.append((noise, sent.detach(), fake_feats if keep_graph else None, fake_emb if keep_graph else None))
            stats["loss_d"] += loss_d.detach() / n
            stats["magp"] += magp.detach() / n
            stats["d_real"] += real_logits.detach().mean() / n
            stats["d_fake"] += fake_logits.detach().mean() / n
            stats["d_mis"] += mis_logits.detach().mean() / n
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()

        # G phase: D and C are frozen for it and used unwrapped (no gradients of theirs to sync).
        self.net_d.requires_grad_(False)
        self.net_c.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        for i, (noise, sent, fake_feats, fake_emb) in enumerate(saved):
            with self._sync(i == n - 1):
                with self.autocast():
                    if fake_feats is None:
                        fake_feats, fake_emb = self.clip.image_features(self.g(noise, sent))
                    fake_logits = self.net_c(self.net_d(fake_feats), sent)
                    loss_g = losses.g_loss(fake_logits.float(), fake_emb.float(), sent, t.sim_w)
                self.scaler_g.scale(loss_g / n).backward()
            stats["loss_g"] += loss_g.detach() / n
            stats["clip_sim"] += torch.cosine_similarity(fake_emb.detach().float(), sent, dim=-1).mean() / n
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        self.net_d.requires_grad_(True)
        self.net_c.requires_grad_(True)

        self.step += 1
        values = torch.stack([torch.as_tensor(v, device=dev, dtype=torch.float32) for v in stats.values()]).tolist()
        out = dict(zip(stats, values))
        bad = [k for k in ("loss_d", "loss_g") if not math.isfinite(out[k])]
        if bad:
            raise NonFiniteLossError(
                f"non-finite {', '.join(bad)} at step {self.step} ({', '.join(f'{k}={out[k]}' for k in bad)}). "
                "The last good checkpoint is kept; lower train.lr_g/train.lr_d or use train.precision=fp32/bf16."
            )
        return out

    # --- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], n_per_prompt: int = 4, seed: int = 0) -> torch.Tensor:
        """Images in [-1, 1] for fixed prompts and fixed noise (comparable across steps)."""
        gen = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(n_per_prompt, self.cfg.model.nz, generator=gen).to(self.env.device)
        tokens = self.clip.tokenize(prompts).to(self.env.device)
        was_training = self.net_g.training
        self.net_g.eval()
        with self.autocast():
            sent, _ = self.clip.encode_text(tokens)
            sent = sent.float().repeat_interleave(n_per_prompt, 0)
            imgs = self.net_g(noise.repeat(len(prompts), 1), sent)
        self.net_g.train(was_training)
        return imgs.float().clamp(-1, 1)

    # --- checkpoints --------------------------------------------------------------------------------
    def _gather(self, obj: Any) -> list[Any]:
        if not self.env.distributed:
            return [obj]
        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out

    def param_checksums(self) -> list[float]:
        return [p.detach().double().sum().item() for m in (self.net_g, self.net_d, self.net_c) for p in m.parameters()]

    def save(self, ckpt_dir: Path) -> Path | None:
        # Collectives: every rank takes part. Replicas that drifted apart (a DDP bug, a rank that
        # skipped a step) would silently train different models; stop instead of checkpointing one.
        noise_states = self._gather(self.noise_gen.get_state())
        checksums = self._gather(self.param_checksums())
        if any(c != checksums[0] for c in checksums):
            raise RuntimeError(f"step {self.step}: parameters differ across ranks; refusing to checkpoint")
        if not self.env.is_main:
            return None
        payload = {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "world_size": self.env.world_size,
            "netG": self.net_g.state_dict(),
            "netD": self.net_d.state_dict(),
            "netC": self.net_c.state_dict(),
            "optG": self.opt_g.state_dict(),
            "optD": self.opt_d.state_dict(),
            "scalerG": self.scaler_g.state_dict(),
            "scalerD": self.scaler_d.state_dict(),
            "rng": capture_rng(),
            "noise_rng": noise_states,
            "rank_param_checksums": checksums,
        }
        path = save_checkpoint(checkpoint_path(ckpt_dir, self.step), payload, keep=self.cfg.train.keep_checkpoints)
        return path

    def load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.env.device)
        self.net_g.load_state_dict(ckpt["netG"])
        self.net_d.load_state_dict(ckpt["netD"])
        self.net_c.load_state_dict(ckpt["netC"])
        self.opt_g.load_state_dict(ckpt["optG"])
        self.opt_d.load_state_dict(ckpt["optD"])
        self.scaler_g.load_state_dict(ckpt["scalerG"])
        self.scaler_d.load_state_dict(ckpt["scalerD"])
        restore_rng(ckpt["rng"])
        states = ckpt["noise_rng"]
        if len(states) == self.env.world_size:
            self.noise_gen.set_state(states[self.env.rank].cpu())
        else:
            log.warning("checkpoint was written by %d processes, now %d: noise streams are reseeded", len(states), self.env.world_size)
            self.noise_gen.manual_seed(segment_seed(self.cfg.train.seed, self.env.rank, ckpt["step"]))
        self.step = int(ckpt["step"])


# --- data ---------------------------------------------------------------------------------------------
class DataCounts:
    """Samples the loaders skipped (corrupt, no caption) or dropped (partial batches), this process."""

    def __init__(self) -> None:
        self.finished = {"data_skipped": 0, "data_dropped": 0}
        self.current = None

    def as_dict(self) -> dict[str, int]:
        cur = self.current
        return {
            "data_skipped": self.finished["data_skipped"] + (cur.skipped if cur else 0),
            "data_dropped": self.finished["data_dropped"] + (getattr(cur, "dropped", 0) if cur else 0),
        }

    def close_segment(self) -> None:
        self.finished, self.current = self.as_dict(), None


def micro_batch_stream(
    cfg: Config, env: DistEnv, tokenizer, start_step: int, counts: DataCounts | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images, tokens) micro-batches; the loader is rebuilt at each checkpoint boundary."""
    from .data import build_loader

    counts = counts or DataCounts()
    per_step = cfg.train.grad_accum
    step = start_step
    while True:
        seg_end = (step // cfg.train.ckpt_every + 1) * cfg.train.ckpt_every
        loader, counts.current = build_loader(
            cfg.data, tokenizer, cfg.train.batch_size,
            seed=segment_seed(cfg.train.seed, env.rank, step), rank=env.rank, world_size=env.world_size,
        )
        it = iter(loader)
        for _ in range((seg_end - step) * per_step):
            try:
                batch = next(it)
            except StopIteration:  # a non-resampled pass ended: start the next epoch
                it = iter(loader)
                batch = next(it)
            yield batch[0], batch[1]
        del it
        counts.close_segment()
        step = seg_end


class TrainLog:
    """Per-step scalars as CSV (DVC plots read it); rows past a resume point are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self.fields: list[str] | None = None
        if path.exists():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
            if rows:
                self.fields = list(rows[0])
            with open(path, "w", newline="") as fh:
                if self.fields:
                    w = csv.DictWriter(fh, self.fields)
                    w.writeheader()
                    w.writerows(rows)

    def write(self, row: dict[str, float]) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, self.fields)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in self.fields})


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_image(images, tmp, nrow=nrow, normalize=True, value_range=(-1, 1))
    tmp.replace(path)
    return path


def _resume_point(cfg: Config, ckpt_dir: Path, env: DistEnv) -> Path | None:
    """Rank 0 picks the newest checkpoint, local or in ``train.checkpoint_uri``; every rank resumes from it.

    A rank whose machine lacks the file (another node, a fresh pod) fetches it from the object store.
    """
    uri, endpoint = cfg.train.checkpoint_uri, cfg.data.s3_endpoint_url
    choice = [""]
    if env.is_main:
        local = latest_checkpoint(ckpt_dir)
        names = [local.name] if local else []
        if uri:
            names += [n for n in storage.list_names(uri, endpoint) if is_checkpoint_name(n)]
        choice = [max(names, default="")]
    if env.distributed:
        dist.broadcast_object_list(choice, src=0)
    if not choice[0]:
        return None
    path = ckpt_dir / choice[0]
    if not path.exists():
        storage.download(f"{uri.rstrip('/')}/{choice[0]}", path, endpoint)
        log.info("fetched %s from %s", choice[0], uri)
    barrier(env)
    return path


def _publish(cfg: Config, path: Path) -> None:
    """Upload a checkpoint after its atomic local write; a failed upload is loud but not fatal."""
    if not cfg.train.checkpoint_uri:
        return
    uri = f"{cfg.train.checkpoint_uri.rstrip('/')}/{path.name}"
    try:
        storage.upload(path, uri, cfg.data.s3_endpoint_url)
    except Exception as exc:  # noqa: BLE001 - the local checkpoint still exists; training goes on
        log.error("upload of %s to %s failed (%s: %s); resume will use the local copy", path.name, uri, type(exc).__name__, exc)


def run(cfg: Config, resume: bool = False, max_steps: int | None = None, clip: FrozenCLIP | None = None) -> dict[str, Any]:
    """Train until ``train.max_steps`` (or ``max_steps``); returns the final step, checkpoint and losses."""
    env = init_distributed(cfg.train.device)
    try:
        return _run(cfg, env, resume, max_steps or cfg.train.max_steps, clip)
    finally:
        cleanup(env)


def _run(cfg: Config, env: DistEnv, resume: bool, max_steps: int, clip: FrozenCLIP | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    out_dir = Path(cfg.train.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
    tracker = Tracker(enabled=env.is_main)
    trainer = Trainer.create(cfg, env, clip)
    start = _resume_point(cfg, ckpt_dir, env)
    if start is not None and not resume:
        raise FileExistsError(
            f"{ckpt_dir} already holds checkpoints (latest {start.name}); pass --resume to continue, "
            "or set train.out_dir to a new folder"
        )
    if start is not None:
        trainer.load(start)
        log.info("resumed from %s (step %d)", start, trainer.step)
    if trainer.step == 0:
        tracker.log_params({**stage_params(cfg, ["train"]), "world_size": env.world_size})
    result: dict[str, Any] = {"step": trainer.step, "checkpoint": str(start) if start else None, "losses": {}}
    if trainer.step >= max_steps:
        return result

    train_log = TrainLog(out_dir / "train_log.csv", trainer.step) if env.is_main else None
    data_counts = DataCounts()
    stream = micro_batch_stream(cfg, env, trainer.clip.tokenizer, trainer.step, data_counts)
    images_per_step = cfg.train.batch_size * cfg.train.grad_accum * env.world_size
    bar = tqdm(total=max_steps, initial=trainer.step, desc="train", disable=not env.is_main, dynamic_ncols=True)
    t0, done_since = time.perf_counter(), 0
    losses_now: dict[str, float] = {}
    while trainer.step < max_steps:
        micro = [next(stream) for _ in range(cfg.train.grad_accum)]
        losses_now = trainer.train_step(micro)
        done_since += 1
        step = trainer.step
        ips = images_per_step * done_since / max(time.perf_counter() - t0, 1e-9)
        bar.update(1)
        bar.set_postfix(d=f"{losses_now['loss_d']:.3f}", g=f"{losses_now['loss_g']:.3f}", img_s=f"{ips:.1f}")
        if train_log is not None and (step % cfg.train.log_every == 0 or step == max_steps):
            row = {**{k: round(v, 6) for k, v in losses_now.items()}, "images_per_s": round(ips, 3), **data_counts.as_dict()}
            train_log.write({"step": step, **row})
            tracker.log_metrics(row, step)
        if env.is_main and (step % cfg.train.sample_every == 0 or step == max_steps):
            grid = save_grid(trainer.sample(list(cfg.train.sample_prompts)), out_dir / "samples" / f"step_{step:08d}.png", nrow=4)
            tracker.log_image(grid, step)
        if step % cfg.train.ckpt_every == 0 or step == max_steps:
            path = trainer.save(ckpt_dir)
            if path is not None:
                _publish(cfg, path)
                result["checkpoint"] = str(path)
            barrier(env)
    bar.close()
    result.update(step=trainer.step, losses=losses_now)
    return result


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(["train", *(argv or [])])


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

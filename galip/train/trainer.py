"""GALIP training: one readable loop, single process or under torchrun (DDP).

    galip train --profile demo
    torchrun --nproc_per_node=8 -m galip train --profile cc12m --resume

Each iteration is the reference's two explicit phases: a D phase (hinge on real / fake / mismatched
pairs + MA-GP on the CLIP features and the sentence) and a G phase (adversarial + CLIP similarity).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ..model import losses
from ..ops import storage
from .checkpoint import (
    capture_rng,
    checkpoint_path,
    is_checkpoint_name,
    load_checkpoint,
    newest_good_checkpoint,
    remove_orphans,
    restore_rng,
    save_checkpoint,
)
from ..model.clip import FrozenCLIP, check_model_config, clip_from_config
from ..config import Config, resume_changes
from ..data.loader import StreamPlan, segment_seed, training_shards, training_stream
from .distributed import DistEnv, barrier, cleanup, init_distributed
from ..errors import UserError
from ..eval.grid import save_labelled_grid
from ..model.models import NetC, NetD, NetG, build_nets
from ..model.precision import Precision, apply_scale_floor, enable_fast_cuda_math
from ..ops.redact import redact
from .runlock import run_lock
from ..ops.tracking import TRAIN_EVAL_PREFIX, Tracker

log = logging.getLogger("galip.train")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf; no checkpoint is written after it."""


class ConfigChangeError(UserError):
    """A resume whose configuration differs from the checkpoint's where it matters."""


class StoreOwnedError(UserError):
    """train.checkpoint_uri holds the checkpoints of another run."""


class ExistingCheckpointsError(UserError, FileExistsError):
    """A run without --resume into a folder (or store) that already holds checkpoints."""


STAT_NAMES = ("loss_d", "loss_g", "d_real", "d_fake", "d_mis", "magp", "clip_sim")


class GeneratorEMA:
    """Exponential moving average of NetG's weights (StyleGAN lineage): what sampling, evaluation
    and the registered model use. The decay ramps up as min(decay, (1 + t) / (10 + t)) so that a short
    run is not dominated by its random initial weights."""

    def __init__(self, net_g: NetG, decay: float) -> None:
        self.decay = decay
        self.model = NetG(net_g.cfg, net_g.clip).to(next(net_g.parameters()).device)
        self.model.load_state_dict(net_g.state_dict())
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net_g: NetG, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        get_ema_multi_avg_fn(decay)(list(self.model.parameters()), list(net_g.parameters()), None)


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
    ema: GeneratorEMA | None = None
    step: int = 0
    origin: dict[str, Any] | None = None  # where the weights came from, if imported (galip import-reference)
    # Which run the weights belong to: new at step 0, carried by every checkpoint, so a resume (on any
    # machine) continues it. train.checkpoint_uri's owner record names one lineage.
    lineage: str = ""

    def __post_init__(self) -> None:
        g, d, c = self.net_g, self.net_d, self.net_c
        if self.env.distributed:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            # NetD keeps the reference's never-applied 1x1 shortcut convs (state-dict layout); DDP must not
            # wait for their gradients. DDP only reduces parameters that require grad: freezing them is the
            # public way (they never get a gradient anyway, so Adam and the checkpoints are unchanged).
            for name in d.unused_parameter_names():
                d.get_parameter(name).requires_grad_(False)
            g, d, c = (DDP(m, device_ids=ids) for m in (g, d, c))
        # The real-image path stays eager: MA-GP differentiates C(D(real)) twice, and compiled graphs
        # do not support double backward. Everything else (G, the fake path, the G phase) may compile.
        self.d_real, self.c_real = d, c
        compile_ = torch.compile if self.cfg.train.compile else (lambda m: m)
        self.g = compile_(g)
        self.d_fake, self.c_fake = compile_(d), compile_(c)
        # G phase: D and C frozen and unwrapped (no gradients of theirs to sync).
        self.d_frozen, self.c_frozen = compile_(self.net_d), compile_(self.net_c)
        self.clip_features = compile_(self.clip.image_features)
        dev = self.env.device
        self._stats = torch.zeros(len(STAT_NAMES), device=dev)  # latest step's, on the device
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=dev)
        self._bad_steps = torch.zeros((), dtype=torch.long, device=dev)
        self._checked_at = self.step

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: Config, env: DistEnv, clip: FrozenCLIP | None = None) -> "Trainer":
        t = cfg.train
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        precision = Precision.resolve(t.precision, env.device)
        if env.device.type == "cuda":
            enable_fast_cuda_math(t.tf32, t.cudnn_benchmark)
        clip = (clip or clip_from_config(cfg.model)).set_precision(precision.dtype).to(env.device)
        net_g, net_d, net_c = (m.to(env.device) for m in build_nets(cfg.model, clip))
        betas = (t.beta1, t.beta2)
        # Fused Adam: one pass over each tensor instead of about ten (same maths; the last bit of a weight can
        # round differently from the for-loop Adam). On CPU a ViT-B/32 step's update went from ~0.3 s of for-loop
        # kernels to ~0.09 s (torch.profiler; bench/README.md, "Against the reference code").
        fused = env.device.type in ("cuda", "cpu")
        opt_g = torch.optim.Adam(net_g.parameters(), lr=t.lr_g, betas=betas, fused=fused)
        opt_d = torch.optim.Adam([*net_d.parameters(), *net_c.parameters()], lr=t.lr_d, betas=betas, fused=fused)
        noise_gen = torch.Generator(env.device).manual_seed(t.seed + env.rank)
        ema = GeneratorEMA(net_g, t.ema_decay) if t.ema_decay > 0 else None
        return cls(
            cfg, env, clip, net_g, net_d, net_c, opt_g, opt_d, precision,
            precision.grad_scaler(), precision.grad_scaler(), noise_gen, ema,
        )

    @property
    def sampler(self) -> NetG:
        """The generator to sample from: the EMA weights when kept, else the trained ones."""
        return self.ema.model if self.ema is not None else self.net_g

    # --- one iteration --------------------------------------------------------------------------
    def autocast(self):
        return self.precision.autocast()

    def _sync(self, last: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
        if last or not self.env.distributed:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in (self.g, self.d_real, self.c_real):
            stack.enter_context(m.no_sync())
        return stack

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One optimiser step of D (+C) and of G over ``grad_accum`` micro-batches of (images, tokens).

        Nothing here waits for the device: the losses stay on it (``read_stats`` copies them at log
        steps) and a non-finite loss is recorded on the device (``check_finite`` raises it).
        """
        t, dev = self.cfg.train, self.env.device
        n = len(micro_batches)
        # With one micro-batch the D phase's fake (and its graph) is reused by the G phase, as in the
        # reference; with accumulation, keeping every micro-batch's graph would defeat the purpose, so
        # the D phase generates without a graph and the G phase regenerates from the same noise.
        keep_graph = n == 1
        stats = torch.zeros(len(STAT_NAMES), device=dev)
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
                real_feats, _ = self.clip_features(real)
            # Leaves for MA-GP: gradients w.r.t. the CLIP features and the sentence, never into CLIP.
            sent = sent.float().requires_grad_(True)
            real_feats = real_feats.float().requires_grad_(True)
            noise = torch.randn(real.shape[0], self.cfg.model.nz, device=dev, generator=self.noise_gen)
            with self._sync(i == n - 1):
                with self.autocast():
                    real_out = self.d_real(real_feats)
                    real_logits = self.c_real(real_out, sent)
                    mis_logits = self.c_real(real_out, losses.mismatched(sent).detach())
                    with contextlib.nullcontext() if keep_graph else torch.no_grad():
                        fake = self.g(noise, sent)
                        fake_feats, fake_emb = self.clip_features(fake)
                    fake_logits = self.c_fake(self.d_fake(fake_feats.detach()), sent)
                    hinge = losses.d_hinge(real_logits, fake_logits, mis_logits)
                # GradScaler has no public tensor accessor for its scale; get_scale() would sync.
                scale = self.scaler_d._get_scale_async() if self.precision.use_scaler else None
                magp = losses.ma_gp(real_logits.float(), real_feats, sent, t.magp_k, t.magp_p, grad_scale=scale)
                loss_d = hinge.float() + magp
                self.scaler_d.scale(loss_d / n).backward()
            saved.append((noise, sent.detach(), fake_feats if keep_graph else None, fake_emb if keep_graph else None))
            parts = (loss_d, None, real_logits.mean(), fake_logits.mean(), mis_logits.mean(), magp, None)
            stats += torch.stack([p.detach().float() if p is not None else stats.new_zeros(()) for p in parts]) / n
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        apply_scale_floor(self.scaler_d)

        # G phase: D and C are frozen for it and used unwrapped (no gradients of theirs to sync).
        self.net_d.requires_grad_(False)
        self.net_c.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        for i, (noise, sent, fake_feats, fake_emb) in enumerate(saved):
            with self._sync(i == n - 1):
                with self.autocast():
                    if fake_feats is None:
                        fake_feats, fake_emb = self.clip_features(self.g(noise, sent))
                    fake_logits = self.c_frozen(self.d_frozen(fake_feats), sent)
                    loss_g = losses.g_loss(fake_logits.float(), fake_emb.float(), sent, t.sim_w)
                self.scaler_g.scale(loss_g / n).backward()
            sim = torch.cosine_similarity(fake_emb.detach().float(), sent, dim=-1).mean()
            stats[1] += loss_g.detach().float() / n
            stats[6] += sim / n
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        apply_scale_floor(self.scaler_g)
        self.net_d.requires_grad_(True)
        self.net_c.requires_grad_(True)

        self.step += 1
        if self.ema is not None:
            self.ema.update(self.net_g, self.step)
        bad = ~torch.isfinite(stats[:2]).all()
        self._first_bad_step = torch.where(bad & (self._first_bad_step < 0), self.step, self._first_bad_step)
        self._bad_steps += bad.long()
        self._stats = stats

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if a loss went NaN/inf (one host sync; call at log/checkpoint steps).

        With fp16 loss scaling an overflowing step is skipped by the GradScaler and training goes on,
        as in the reference; only a run whose every step since the last check overflowed is stopped.
        """
        steps_since_check, self._checked_at = self.step - self._checked_at, self.step
        if steps_since_check == 0:
            return
        first_bad, n_bad = (int(v) for v in torch.stack([self._first_bad_step, self._bad_steps]).tolist())
        if first_bad < 0:
            return
        if self.precision.use_scaler and n_bad < steps_since_check:
            self._first_bad_step.fill_(-1)
            self._bad_steps.zero_()
            log.warning("%d fp16 step(s) overflowed and were skipped by the loss scaler", n_bad)
            return
        raise NonFiniteLossError(
            f"non-finite loss_d/loss_g at step {first_bad} ({n_bad} bad step(s) up to step {self.step}). "
            "The last good checkpoint is kept; lower train.lr_g/train.lr_d or use train.precision=fp32/bf16."
        )

    def read_stats(self) -> dict[str, float]:
        """The latest step's losses, copied to the host (a device sync)."""
        return dict(zip(STAT_NAMES, self._stats.tolist()))

    # --- sampling ---------------------------------------------------------------------------------
    def sample(self, prompts: list[str], n_per_prompt: int = 4, seed: int = 0) -> torch.Tensor:
        """Images in [-1, 1] for fixed prompts and fixed noise (comparable across steps), from the EMA."""
        from ..eval.generate import generate_images

        return generate_images(self.sampler, self.clip, prompts, n_per_prompt, seed, precision=self.precision)

    # --- checkpoints --------------------------------------------------------------------------------
    def _gather(self, obj: Any) -> list[Any]:
        if not self.env.distributed:
            return [obj]
        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out

    def param_checksums(self) -> list[float]:
        return [p.detach().double().sum().item() for m in (self.net_g, self.net_d, self.net_c) for p in m.parameters()]

    def save(self, ckpt_dir: Path, protect: Path | None = None) -> Path | None:
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
            **({"netG_ema": self.ema.model.state_dict()} if self.ema is not None else {}),
            "optG": self.opt_g.state_dict(),
            "optD": self.opt_d.state_dict(),
            "scalerG": self.scaler_g.state_dict(),
            "scalerD": self.scaler_d.state_dict(),
            "rng": capture_rng(),
            "noise_rng": noise_states,
            "rank_param_checksums": checksums,
        }
        payload["lineage"] = self.lineage
        if self.origin:
            payload["origin"] = self.origin  # provenance of an imported model survives fine-tuning
        path = save_checkpoint(checkpoint_path(ckpt_dir, self.step), payload, keep=self.cfg.train.keep_checkpoints, protect=protect)
        return path

    def load(self, path: Path, allow_config_change: bool = False) -> None:
        ckpt = load_checkpoint(path, map_location=self.env.device)
        model_changes, recipe_changes = resume_changes(ckpt["config"], self.cfg)
        changes = model_changes + recipe_changes
        if changes and not allow_config_change:
            raise ConfigChangeError(
                f"resume from {path.name}: the configuration differs from the checkpoint's ({'; '.join(changes)}); "
                "restore those values, set train.out_dir to a new folder, or pass --allow-config-change to continue with the new ones"
            )
        if changes:
            log.warning("resume from %s with a changed configuration (--allow-config-change): %s", path.name, "; ".join(changes))
        try:
            self.net_g.load_state_dict(ckpt["netG"])
            for key, net in (("netD", self.net_d), ("netC", self.net_c)):
                if key in ckpt:
                    net.load_state_dict(ckpt[key])
        except RuntimeError as exc:
            raise ConfigChangeError(
                f"resume from {path.name}: its weights do not fit the networks of this configuration ({'; '.join(model_changes)}): "
                f"{str(exc).splitlines()[0]}; restore those model.* values or set train.out_dir to a new folder"
            ) from None
        # An imported checkpoint (galip import-reference) may hold only G: the rest starts fresh.
        parts = {"optG": self.opt_g, "optD": self.opt_d, "scalerG": self.scaler_g, "scalerD": self.scaler_d}
        for key, target in parts.items():
            if key in ckpt:
                target.load_state_dict(ckpt[key])
        fresh = [key for key in ("netD", "netC", *parts) if key not in ckpt]
        if fresh:
            log.warning("%s holds no %s: those start fresh", path.name, ", ".join(fresh))
        # The optimiser state restores the saved learning rates and betas; the configuration in force wins
        # (the same values unless --allow-config-change let them differ).
        t = self.cfg.train
        for opt, lr in ((self.opt_g, t.lr_g), (self.opt_d, t.lr_d)):
            for group in opt.param_groups:
                group["lr"], group["betas"] = lr, (t.beta1, t.beta2)
        if self.ema is not None:
            # A checkpoint from a run without EMA (or an import) starts the average from its weights.
            self.ema.model.load_state_dict(ckpt.get("netG_ema", ckpt["netG"]))
        self.origin = ckpt.get("origin")
        self.lineage = ckpt.get("lineage", "")
        if "rng" in ckpt:
            restore_rng(ckpt["rng"])
        states = ckpt.get("noise_rng") or []
        if len(states) == self.env.world_size:
            self.noise_gen.set_state(states[self.env.rank].cpu())
        else:
            if states:
                log.warning("checkpoint was written by %d processes, now %d: noise streams are reseeded", len(states), self.env.world_size)
            self.noise_gen.manual_seed(segment_seed(self.cfg.train.seed, self.env.rank, ckpt["step"]))
        self.step = self._checked_at = int(ckpt["step"])


class BestCheckpoint:
    """The best checkpoint so far by the gate metric (``mlflow.gate_metric`` / ``gate_direction``),
    kept in ``{out_dir}/best.json``: what evaluation and registration use instead of simply the last."""

    FILE = "best.json"

    def __init__(self, out_dir: Path, metric: str, direction: str, resume_step: int) -> None:
        self.path, self.metric, self.direction = out_dir / self.FILE, metric, direction
        self.state: dict[str, Any] | None = None
        if self.path.exists():
            state = json.loads(self.path.read_text())
            # a record from past the resume point (a longer, abandoned run) is not this run's
            if state.get("metric") == metric and int(state.get("step", 0)) <= resume_step:
                self.state = state

    @property
    def checkpoint(self) -> Path | None:
        return Path(self.state["checkpoint"]) if self.state else None

    def consider(self, step: int, checkpoint: Path, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        old = None if self.state is None else self.state["value"]
        if old is not None and not (value > old if self.direction == "higher" else value < old):
            return False
        self.state = {"metric": self.metric, "direction": self.direction, "value": value, "step": step, "checkpoint": str(checkpoint)}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.path)
        return True


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


def _retry(cfg: Config) -> storage.Retry:
    return storage.Retry(cfg.train.storage_retries, cfg.train.storage_backoff_s, cfg.train.storage_deadline_s)


def _resume_point(cfg: Config, ckpt_dir: Path, env: DistEnv) -> Path | None:
    """Rank 0 picks the newest checkpoint, local or in ``train.checkpoint_uri``; every rank resumes from it.

    A local checkpoint that fails verification is moved aside for the one before it. When the store
    does not answer (within ``train.storage_retries`` and ``train.storage_deadline_s``) the local checkpoints
    decide (or, with ``train.require_checkpoint_upload``, the run stops), said in one line;
    with none local the run stops, as it cannot tell what it would start over. A rank whose machine
    lacks the chosen file fetches it from the object store.
    """
    uri, endpoint = cfg.train.checkpoint_uri, cfg.data.s3_endpoint_url
    choice = [""]
    if env.is_main:
        local = newest_good_checkpoint(ckpt_dir)
        names = [local.name] if local else []
        if uri:
            try:
                names += [n for n in storage.list_names(uri, endpoint, _retry(cfg)) if is_checkpoint_name(n)]
            except storage.StorageError as exc:
                if local is None:
                    raise storage.StorageError(
                        f"{exc}. {ckpt_dir} holds no checkpoint, so the store decides where this run starts: "
                        "retry when it answers, or set train.checkpoint_uri to '' or a new prefix to start from step 0"
                    ) from None
                if cfg.train.require_checkpoint_upload:
                    raise storage.StorageError(
                        f"{exc}; train.require_checkpoint_upload is set, so this run does not go on from the local {local.name} "
                        "while the store may hold newer checkpoints"
                    ) from None
                log.warning("%s; going on from the local %s (the store may hold newer checkpoints)", exc, local.name)
        choice = [max(names, default="")]
    if env.distributed:
        dist.broadcast_object_list(choice, src=0)
    if not choice[0]:
        return None
    path = ckpt_dir / choice[0]
    if not path.exists():
        storage.download(f"{uri.rstrip('/')}/{choice[0]}", path, endpoint, _retry(cfg))
        log.info("fetched %s from %s", choice[0], redact(uri))
    barrier(env)
    return path


OWNER_RECORD = "galip-owner.json"


def _check_store_owner(cfg: Config, lineage: str, uploads: Uploads, claim: bool) -> None:
    """The store's rule, like the out_dir lock's: one run per train.checkpoint_uri. Its first upload
    writes an owner record naming the run's lineage; another lineage is refused in one line, a resume
    of the same run (any machine) is accepted. Unreachable store: checked again at the next upload."""
    uri = f"{cfg.train.checkpoint_uri.rstrip('/')}/{OWNER_RECORD}"
    text = storage.read_text(uri, cfg.data.s3_endpoint_url, _retry(cfg))
    if text is not None:
        owner = json.loads(text)
        if owner.get("lineage") != lineage:
            raise StoreOwnedError(
                f"train.checkpoint_uri={redact(cfg.train.checkpoint_uri)} holds the checkpoints of another run (written from "
                f"{owner.get('out_dir')} on {owner.get('host')} since {owner.get('since')}); resume that run (--resume from its "
                f"checkpoints), or set train.checkpoint_uri to a new prefix"
            )
    elif claim:
        record = {"lineage": lineage, "out_dir": str(Path(cfg.train.out_dir).resolve()), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        storage.write_text(uri, json.dumps(record), cfg.data.s3_endpoint_url, _retry(cfg))
    else:
        return
    uploads.owner_checked = True


@dataclass
class Uploads:
    """Checkpoint uploads to ``train.checkpoint_uri`` this run (rank 0)."""

    ok: int = 0
    failed: int = 0
    newest: str = ""  # the newest checkpoint written
    newest_stored: bool = False
    owner_checked: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "failed": self.failed, "newest_in_store": self.newest_stored}


def _publish(cfg: Config, path: Path, uploads: Uploads, lineage: str) -> None:
    """Upload a checkpoint after its atomic local write; a failed upload is counted and said in one line,
    and training goes on (the local copy exists)."""
    if not cfg.train.checkpoint_uri:
        return
    uri = f"{cfg.train.checkpoint_uri.rstrip('/')}/{path.name}"
    uploads.newest = path.name
    try:
        if not uploads.owner_checked:
            _check_store_owner(cfg, lineage, uploads, claim=True)
        storage.upload(path, uri, cfg.data.s3_endpoint_url, _retry(cfg))
    except StoreOwnedError:
        raise
    except Exception as exc:  # noqa: BLE001 - the local checkpoint still exists; training goes on
        uploads.failed += 1
        uploads.newest_stored = False
        reason = exc if isinstance(exc, storage.StorageError) else f"upload to {redact(uri)} failed ({type(exc).__name__}: {redact(str(exc))})"
        log.error("%s; %s stays local only (%d failed upload(s) so far)", reason, path.name, uploads.failed)
        return
    uploads.ok += 1
    uploads.newest_stored = True


def _report_uploads(cfg: Config, uploads: Uploads, ckpt_dir: Path, tracker: Tracker, step: int) -> None:
    """End of run: the upload count in MLflow; a clear warning (or, by config, an error) when the newest
    checkpoint never reached the store."""
    tracker.log_metrics({"checkpoint_uploads_failed": uploads.failed, "checkpoint_uploads_ok": uploads.ok}, step)
    if not uploads.newest or uploads.newest_stored:
        return
    message = (
        f"the newest checkpoint {uploads.newest} did not reach train.checkpoint_uri={redact(cfg.train.checkpoint_uri)} "
        f"({uploads.failed} of {uploads.ok + uploads.failed} uploads failed this run); it exists only in {ckpt_dir}"
    )
    if cfg.train.require_checkpoint_upload:
        raise storage.StorageError(f"{message} (train.require_checkpoint_upload)")
    log.warning("%s", message)


def run(
    cfg: Config, resume: bool = False, max_steps: int | None = None, clip: FrozenCLIP | None = None, allow_config_change: bool = False
) -> dict[str, Any]:
    """Train until ``train.max_steps`` (or ``max_steps``); returns the final step, checkpoint and losses."""
    env = init_distributed(cfg.train.device)
    try:
        check_before_work(cfg, env, clip)
        # One writer per out_dir: rank 0 holds the lock for the run's life (checked before any work).
        with run_lock(cfg.train.out_dir, enabled=env.is_main):
            return _run(cfg, env, resume, max_steps or cfg.train.max_steps, clip, allow_config_change)
    finally:
        cleanup(env)


def check_before_work(cfg: Config, env: DistEnv, clip: FrozenCLIP | None = None) -> None:
    """Refuse what can be refused without building anything (model.* against the CLIP's own config,
    the CLIP weights, the local shards), so that a refused run has written nothing."""
    if clip is None:
        check_model_config(cfg.model)
    if not (cfg.data.shards or cfg.data.shards_dir).startswith("s3://"):  # a store is listed when training starts
        training_shards(cfg.data, env.world_size)


def _run(cfg: Config, env: DistEnv, resume: bool, max_steps: int, clip: FrozenCLIP | None, allow_config_change: bool = False) -> dict[str, Any]:
    from tqdm.auto import tqdm

    out_dir = Path(cfg.train.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if env.is_main:
        remove_orphans(ckpt_dir)  # temp files of a write a kill interrupted (we hold the lock)
    tracker = Tracker(enabled=env.is_main, settings=cfg.mlflow)
    trainer = Trainer.create(cfg, env, clip)
    start = _resume_point(cfg, ckpt_dir, env)
    if start is not None and not resume:
        raise ExistingCheckpointsError(
            f"{ckpt_dir}{' or train.checkpoint_uri' if cfg.train.checkpoint_uri else ''} already holds checkpoints "
            f"(latest {start.name}); pass --resume to continue, "
            "or set train.out_dir to a new folder"
        )
    if start is not None:
        trainer.load(start, allow_config_change)
        log.info("resumed from %s (step %d)", start, trainer.step)
    trainer.lineage = trainer.lineage or uuid.uuid4().hex
    uploads = Uploads()
    if env.is_main and cfg.train.checkpoint_uri:
        with contextlib.suppress(storage.StorageError):  # unreachable: the first upload checks
            _check_store_owner(cfg, trainer.lineage, uploads, claim=False)
    if env.is_main:
        # Only now that the resume is accepted: a refused one leaves the config its checkpoints were trained with.
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
    result: dict[str, Any] = {"step": trainer.step, "checkpoint": str(start) if start else None, "losses": {}}
    if trainer.step >= max_steps:
        return result

    train_log = TrainLog(out_dir / "train_log.csv", trainer.step) if env.is_main else None
    t = cfg.train
    # One loader for the whole run: its workers walk from checkpoint segment to segment themselves.
    stream, data_stats = training_stream(
        cfg.data, trainer.clip.tokenizer, t.batch_size, seed=t.seed, rank=env.rank, world_size=env.world_size,
        plan=StreamPlan(trainer.step, t.ckpt_every, t.grad_accum),
    )
    evaluator, best, eval_log, evaluated_at = None, None, None, trainer.step
    if env.is_main and t.eval_every:
        from ..eval.evaluate import TrainingEvaluator

        evaluator = TrainingEvaluator(cfg, env.device, trainer.clip, cfg.model.nz)
        best = BestCheckpoint(out_dir, cfg.mlflow.gate_metric, cfg.mlflow.gate_direction, trainer.step)
        eval_log = TrainLog(out_dir / "eval_log.csv", trainer.step)
    images_per_step = t.batch_size * t.grad_accum * env.world_size
    bar = tqdm(total=max_steps, initial=trainer.step, desc="train", disable=not env.is_main, dynamic_ncols=True)
    if env.is_main and trainer.step == 0:
        # The untrained generator: the first point of the grid history (train.sample_every after it).
        grid = save_labelled_grid(trainer.sample(list(t.sample_prompts)), t.sample_prompts, out_dir / "samples" / f"step_{0:08d}.png", n_per_row=4)
        tracker.log_grid(grid, 0)
    t_log, step_log = time.perf_counter(), trainer.step
    losses_now: dict[str, float] = {}
    while trainer.step < max_steps:
        trainer.train_step([next(stream)[:2] for _ in range(t.grad_accum)])
        step = trainer.step
        bar.update(1)
        last = step == max_steps
        if step % t.log_every == 0 or last:
            # The only host syncs of the loop: losses and the non-finite check, every log_every steps.
            trainer.check_finite()
            losses_now = trainer.read_stats()
            now = time.perf_counter()
            ips = images_per_step * (step - step_log) / max(now - t_log, 1e-9)
            t_log, step_log = now, step
            bar.set_postfix(d=f"{losses_now['loss_d']:.3f}", g=f"{losses_now['loss_g']:.3f}", img_s=f"{ips:.1f}")
            if train_log is not None:
                counts = {"data_skipped": data_stats.skipped, "data_dropped": data_stats.dropped}
                row = {**{k: round(v, 6) for k, v in losses_now.items()}, "images_per_s": round(ips, 3), **counts}
                train_log.write({"step": step, **row})
                tracker.log_metrics(row, step)
        if env.is_main and (step % t.sample_every == 0 or last):
            grid = save_labelled_grid(trainer.sample(list(t.sample_prompts)), t.sample_prompts, out_dir / "samples" / f"step_{step:08d}.png", n_per_row=4)
            tracker.log_grid(grid, step)
        if step % t.ckpt_every == 0 or last:
            trainer.check_finite()  # never checkpoint weights that a NaN went through
            path = trainer.save(ckpt_dir, protect=best.checkpoint if best else None)
            if path is not None:
                _publish(cfg, path, uploads, trainer.lineage)
                result["checkpoint"] = str(path)
            # The best checkpoint is what the flow registers, so evaluations run on checkpoint steps: the
            # first one at or after each eval_every boundary, and the last.
            if evaluator is not None and path is not None and (step // t.eval_every > evaluated_at // t.eval_every or last):
                evaluated_at = step
                scores = evaluator(trainer.sampler)
                eval_log.write({"step": step, **{k: round(v, 4) for k, v in scores.items()}})
                tracker.log_metrics({TRAIN_EVAL_PREFIX + k: v for k, v in scores.items()}, step)
                if best.consider(step, path, scores):
                    log.info("step %d: best %s so far (%.4g)", step, best.metric, scores[best.metric])
                bar.write(f"eval @ {step}: " + ", ".join(f"{k} {v:.3g}" for k, v in scores.items()))
            barrier(env)
    bar.close()
    result.update(step=trainer.step, losses=losses_now)
    if best is not None and best.state:
        result["best"] = best.state
    if env.is_main and cfg.train.checkpoint_uri:
        result["checkpoint_uploads"] = uploads.as_dict()
        _report_uploads(cfg, uploads, ckpt_dir, tracker, trainer.step)
    result["mlflow_failures"] = tracker.report()
    return result

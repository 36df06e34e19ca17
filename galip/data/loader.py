"""Training data: webdataset shards -> augmented images in [-1, 1] + tokenised captions.

One pipeline, ``training_stream``: what the trainer reads is what the tests and bench/loader.py read.
A list of webdataset stages (open_clip / StyleGAN-T style): shard list (resampled, or split by rank
and by worker) -> tar members -> shuffle buffer -> decode + reference augmentation + one random
caption -> tokenise -> batch. Corrupt samples are skipped and counted, never a crash or a silent drop:
each DataLoader worker counts what it skipped and the counts ride along with its batches to the
main process, where ``LoaderStats`` sums them.
"""

from __future__ import annotations

import functools
import io
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from ..errors import MissingInputError, UserError
from ..ops.storage import s3_filesystem

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
PARTIAL_BATCH = "partial_last_batch"
CAPTION_KEYS = ("txt", "caption")


class ShardSplitError(UserError, ValueError):
    """Non-resampled shards cannot be split evenly across ranks x workers (DDP would hang)."""


@dataclass
class LoaderStats:
    """Skipped-sample counts summed over DataLoader workers.

    Each worker's counts are cumulative over the run and ride along with its batches, so the latest
    per worker is kept: skips after a worker's newest batch show up with its next one.
    """

    per_worker: dict[int, Counter] = field(default_factory=dict)

    def update(self, worker: int, counts: dict[str, int]) -> None:
        self.per_worker[worker] = Counter(counts)

    @property
    def reasons(self) -> dict[str, int]:
        total: Counter = Counter()
        for c in self.per_worker.values():
            total.update(c)
        return dict(total)

    @property
    def skipped(self) -> int:
        """Unusable samples (corrupt image, missing caption, unreadable tar member)."""
        return sum(n for reason, n in self.reasons.items() if reason != PARTIAL_BATCH)

    @property
    def dropped(self) -> int:
        """Good samples left over at the end of a pass, short of a full batch."""
        return self.reasons.get(PARTIAL_BATCH, 0)


class DataQualityError(RuntimeError):
    """Most samples are unusable: training would spin on skips forever instead of stepping."""


class _SkipCounter:
    """Per-worker counter; also the webdataset error handler (count, then continue).

    Past ``max_fraction`` unusable samples (after ``MIN_SAMPLES``) it raises DataQualityError: with
    resampled shards a data set whose every sample is corrupt would otherwise never yield a batch.
    """

    MIN_SAMPLES = 100

    def __init__(self, max_fraction: float = 1.0) -> None:
        self.counts: Counter = Counter()
        self.good = 0
        self.max_fraction = max_fraction

    def skip(self, reason: str, n: int = 1) -> None:
        self.counts[reason] += n
        if reason == PARTIAL_BATCH:
            return
        bad = sum(v for k, v in self.counts.items() if k != PARTIAL_BATCH)
        seen = bad + self.good
        if seen >= self.MIN_SAMPLES and bad > self.max_fraction * seen:
            top = ", ".join(f"{k}: {v}" for k, v in self.counts.most_common(3))
            raise DataQualityError(
                f"{bad} of {seen} samples were unusable ({top}), more than data.max_skip_fraction="
                f"{self.max_fraction}: check the shards (galip download's data report) or raise the limit"
            )

    def handler(self, exn: Exception) -> bool:
        if isinstance(exn, DataQualityError):
            raise exn
        self.skip(type(exn).__name__)
        return True


# --- shard discovery ------------------------------------------------------------------------------
def _register_s3_gopen(endpoint_url: str) -> None:
    """Let webdataset open s3:// shards through s3fs (endpoint configurable for S3-compatibles)."""
    import webdataset as wds

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
        return s3_filesystem(endpoint_url).open(url, mode, block_size=max(bufsize, 2**22))

    wds.gopen_schemes["s3"] = gopen_s3


def manifest_shards(data_cfg: DataConfig) -> list[str] | None:
    """The shards ``data.manifest`` lists, when it describes ``data.shards_dir`` (the download's data version)."""
    import json

    from .download import manifest_urls

    path = Path(data_cfg.manifest)
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return manifest_urls(manifest) if manifest.get("shards_dir") == data_cfg.shards_dir and manifest["shards"] else None


def resolve_shards(data_cfg: DataConfig, shards: str | None = None) -> list[str]:
    """Shard URLs from ``shards`` / ``data.shards`` (brace pattern, .tar, folder), else the ones
    ``data.manifest`` lists, else every .tar in ``data.shards_dir``."""
    from braceexpand import braceexpand

    if not (shards or data_cfg.shards):
        listed = manifest_shards(data_cfg)
        if listed:
            return listed
    spec = shards or data_cfg.shards or data_cfg.shards_dir
    if "{" in spec:
        urls = list(braceexpand(spec))
    elif spec.endswith(".tar"):
        urls = [spec]
    elif spec.startswith("s3://"):
        fs = s3_filesystem(data_cfg.s3_endpoint_url)
        urls = sorted(f"s3://{p}" for p in fs.glob(spec.rstrip("/") + "/*.tar"))
    else:
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
    if not urls:
        raise MissingInputError(f"no .tar shards at {spec!r} (data.shards / data.shards_dir): run `galip download` first")
    return urls


# --- per-sample work ----------------------------------------------------------------------------------
def augment(img: Image.Image, data_cfg: DataConfig, rng: random.Random) -> torch.Tensor:
    """Reference augmentation: resize (shorter side, bilinear) -> random crop -> horizontal flip -> [-1, 1].

    tobran/GALIP: transforms.Resize(int(imsize * 76 / 64)) (torchvision's default, bilinear) on the full
    image, RandomCrop(imsize), RandomHorizontalFlip. The shards keep each image's aspect ratio with the
    shorter side at data.image_size (img2dataset keep_ratio), so the crop sees the whole picture.
    """
    import torchvision.transforms.functional as TF

    img = img.convert("RGB")
    img = TF.resize(img, data_cfg.load_size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    w, h = img.size
    c = data_cfg.crop_size
    top, left = rng.randint(0, h - c), rng.randint(0, w - c)
    img = TF.crop(img, top, left, c, c)
    if data_cfg.hflip and rng.random() < 0.5:
        img = TF.hflip(img)
    # numpy, not torch ops: in the training process (data.workers=0) torch's intra-op threads wait on
    # the model's threads, and .contiguous()/stack on an image got 20-50x slower (bench/loader.py)
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(arr))


def _caption(sample: dict[str, Any], rng: random.Random) -> str | None:
    for key in CAPTION_KEYS:
        raw = sample.get(key)
        if raw:
            lines = [ln.strip() for ln in raw.decode("utf-8", "replace").splitlines() if ln.strip()]
            if lines:
                return rng.choice(lines)  # several captions per image (COCO-style): one at random
    return None


def _prepare(
    src: Iterator[dict], data_cfg: DataConfig, tokenizer, counter: _SkipCounter, seed: int, rank: int, worker: int
) -> Iterator[tuple]:
    rng = random.Random(seed * 7_919 + rank * 131 + worker)
    for sample in src:
        caption = _caption(sample, rng)
        if caption is None:
            counter.skip("missing_caption")
            continue
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            counter.skip("missing_image")
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                image = augment(img, data_cfg, rng)
        except Exception as exn:  # noqa: BLE001 - any decode failure: count, keep going
            counter.skip(f"bad_image:{type(exn).__name__}")
            continue
        counter.good += 1
        yield image, tokenizer([caption])[0], caption


def _batch(src: Iterator[tuple], batch_size: int, counter: _SkipCounter) -> Iterator[tuple]:
    items: list[tuple] = []
    for item in src:
        items.append(item)
        if len(items) == batch_size:
            images, tokens, captions = zip(*items)
            batch = torch.from_numpy(np.stack([im.numpy() for im in images]))  # numpy: see augment()
            yield batch, torch.stack(tokens), list(captions)
            items = []
    # A partial last batch is dropped (batches must stack; every rank must take equal steps), but
    # counted (webdataset's batched(partial=False) drops it silently).
    if items:
        counter.skip(PARTIAL_BATCH, len(items))


def _shard_order(urls: list[str], seed: int, epoch: int) -> list[dict[str, str]]:
    """The shard list in a seeded order that changes per pass and is the same on every rank, so that
    splitting it by rank and then by worker gives disjoint parts that cover every shard."""
    order = list(urls)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [{"url": url} for url in order]


def check_even_split(n_shards: int, world_size: int, workers: int) -> None:
    parts = world_size * max(workers, 1)
    if n_shards % parts:
        raise ShardSplitError(
            f"{n_shards} shards cannot be split evenly over {world_size} ranks x {max(workers, 1)} workers "
            f"({parts} parts): ranks would take different numbers of steps and DDP would hang. Use "
            "data.resampled=true, or re-shard to a multiple of ranks x workers, or change data.workers."
        )


def _split_by_rank(rank: int, world_size: int):
    """split_by_node with the rank given explicitly (the trainer knows it; no process group needed)."""
    from itertools import islice

    def split(src):
        yield from islice(src, rank, None, world_size)

    return split


# --- the training stream -----------------------------------------------------------------------------------
def segment_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the data segment that starts at ``step`` (a checkpoint boundary) on ``rank``."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**31 - 1)


@dataclass(frozen=True)
class StreamPlan:
    """Where a run's data stream starts and how it is cut: one segment per checkpoint interval."""

    start_step: int
    segment_steps: int  # train.ckpt_every
    batches_per_step: int = 1  # train.grad_accum


class TrainingStream(torch.utils.data.IterableDataset):
    """Endless training micro-batches that a resumed run reproduces exactly, from persistent workers.

    The stream is cut into segments at checkpoint boundaries; segment s is a pure function of
    (seed, rank, first step of s): W *virtual* pipelines (W = data.workers), each with its own
    shard draw and shuffle buffer, whose batches interleave round-robin. DataLoader workers live
    for the whole run and walk from segment to segment themselves (no re-spawn between checkpoints):
    each one computes which virtual pipeline lands in its round-robin slots in the coming segment,
    so the batch order equals that of a loader built fresh at the segment start. A run resumed at a
    step inside a segment (a final checkpoint at max_steps) replays the segment and skips the batches
    already trained on, so resuming anywhere is exact.
    """

    def __init__(
        self, urls: list[str], data_cfg: DataConfig, tokenize: Callable, batch_size: int,
        seed: int, rank: int, world_size: int, plan: StreamPlan,
    ) -> None:
        super().__init__()
        self.urls, self.data_cfg, self.tokenize, self.batch_size = urls, data_cfg, tokenize, batch_size
        self.seed, self.rank, self.world_size, self.plan = seed, rank, world_size, plan

    def __iter__(self) -> Iterator[tuple]:
        from itertools import islice

        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = _SkipCounter(self.data_cfg.max_skip_fraction)  # this worker's counts over the whole run
        plan = self.plan
        per_segment = plan.segment_steps * plan.batches_per_step
        seg_start = plan.start_step - plan.start_step % plan.segment_steps
        skip = (plan.start_step - seg_start) * plan.batches_per_step  # batches of this segment already trained on
        served = 0  # loader-wide batch index at the segment start (round-robin slot of worker 0)
        while True:
            virtual = (worker - served + skip) % n_workers
            first = max(0, -(-(skip - virtual) // n_workers))  # virtual batch j is segment batch virtual + j * W
            stop = -(-(per_segment - virtual) // n_workers)
            batches = self._virtual_pipeline(seg_start, virtual, n_workers, counter)
            try:
                for images, tokens, captions in islice(batches, first, stop):
                    yield images, tokens, captions, worker, dict(counter.counts)
            finally:
                batches.close()
            served += per_segment - skip
            seg_start, skip = seg_start + plan.segment_steps, 0

    def _virtual_pipeline(self, seg_start: int, virtual: int, n_virtual: int, counter: _SkipCounter) -> Iterator[tuple]:
        """Batches of one virtual worker, pass after pass (a non-resampled pass ends; the next begins)."""
        import webdataset as wds

        cfg, rank = self.data_cfg, self.rank
        seed = segment_seed(self.seed, rank, seg_start)
        # The shard order must not depend on the rank: each rank takes its slice of the same order.
        order_seed = segment_seed(self.seed, 0, seg_start)
        for epoch in itertools.count():
            pass_seed = seed + epoch * 104_723
            if cfg.resampled:
                # Shards drawn with replacement; seeded by the virtual worker (webdataset's default
                # worker_seed is the DataLoader worker's, which would not survive a change of workers).
                worker_seed = functools.partial(int, seed * 1_000_003 + rank * 7_919 + virtual)
                source = [wds.ResampledShards(self.urls, worker_seed=worker_seed, deterministic=True)]
            else:
                source = [
                    functools.partial(_shard_order, self.urls, order_seed, epoch),
                    _split_by_rank(rank, self.world_size),
                    _split_by_rank(virtual, n_virtual),
                ]
            shuffle = [wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, seed=pass_seed * 104_729 + rank * 1_009 + virtual)]
            pipeline = wds.DataPipeline(
                *source,
                wds.tarfile_to_samples(handler=counter.handler),
                *(shuffle if cfg.shuffle_buffer > 1 else []),
                lambda src: _prepare(src, cfg, self.tokenize, counter, pass_seed, rank, virtual),
                lambda src: _batch(src, self.batch_size, counter),
            )
            produced = False
            for images, tokens, captions in pipeline:
                produced = True
                yield images, tokens, captions
            if not produced:
                raise RuntimeError(
                    f"a full pass over {len(self.urls)} shard(s) gave no usable batch of {self.batch_size} "
                    f"(skipped: {dict(counter.counts)}); check data.shards_dir and the data report"
                )


def training_shards(data_cfg: DataConfig, world_size: int) -> list[str]:
    """The shards a training run reads; refused when there are none or they cannot be split evenly."""
    urls = resolve_shards(data_cfg)
    if not data_cfg.resampled:
        check_even_split(len(urls), world_size, data_cfg.workers)
    return urls


def training_stream(
    data_cfg: DataConfig,
    tokenize: Callable[[Sequence[str]], torch.Tensor],
    batch_size: int,
    *,
    seed: int,
    plan: StreamPlan,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]], LoaderStats]:
    """Endless (images, tokens, captions) micro-batches for the trainer from one DataLoader that lives as long
    as the run; ``LoaderStats`` counts what its workers skipped (cumulative per worker)."""
    urls = training_shards(data_cfg, world_size)
    if any(u.startswith("s3://") for u in urls):
        _register_s3_gopen(data_cfg.s3_endpoint_url)
    dataset = TrainingStream(urls, data_cfg, tokenize, batch_size, seed, rank, world_size, plan)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=data_cfg.workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
    )
    stats = LoaderStats()

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        for images, tokens, captions, worker, counts in loader:
            stats.update(int(worker), counts)
            yield images, tokens, captions

    return batches(), stats

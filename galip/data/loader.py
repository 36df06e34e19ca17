"""Training data: webdataset shards -> augmented images in [-1, 1] + tokenised captions.

A pipeline of webdataset stages (open_clip / StyleGAN-T style): shard list (resampled, or split by
node and by worker) -> tar members -> shuffle buffer -> decode + reference augmentation + one random
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
    """Skipped-sample counts summed over DataLoader workers and epochs.

    Each worker's counts are cumulative within a pass, so the latest per (epoch, worker) is kept.
    """

    per_worker: dict[tuple[int, int], Counter] = field(default_factory=dict)

    def update(self, epoch: int, worker: int, counts: dict[str, int]) -> None:
        self.per_worker[(epoch, worker)] = Counter(counts)

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


def _worker_identity(rank: int | None, worker: int | None) -> tuple[int, int]:
    """(rank, worker) given explicitly (the training stream), else as torch/torchrun report them."""
    from webdataset.utils import pytorch_worker_info

    env_rank, _, env_worker, _ = pytorch_worker_info()
    return (env_rank if rank is None else rank), (env_worker if worker is None else worker)


def _prepare(
    src: Iterator[dict], data_cfg: DataConfig, tokenizer, counter: _SkipCounter, seed: int,
    rank: int | None = None, worker: int | None = None,
) -> Iterator[tuple]:
    rank, worker = _worker_identity(rank, worker)
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


def _shuffle(src: Iterator, bufsize: int, seed: int, rank: int | None = None, worker: int | None = None) -> Iterator:
    """Seeded shuffle buffer (webdataset's default seeds from pid + time, which breaks exact resume)."""
    if bufsize <= 1:
        yield from src
        return
    rank, worker = _worker_identity(rank, worker)
    rng = random.Random(seed * 104_729 + rank * 1_009 + worker)
    buf: list = []
    for item in src:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        k = rng.randrange(len(buf))
        buf[k], item = item, buf[k]
        yield item
    rng.shuffle(buf)
    yield from buf


_END = "__end_of_worker_stream__"


def _batch(src: Iterator[tuple], batch_size: int, counter: _SkipCounter, per_pass: bool = True) -> Iterator[tuple]:
    from webdataset.utils import pytorch_worker_info

    _, _, worker, _ = pytorch_worker_info()
    if per_pass:  # without workers the counter lives on in the main process between epochs
        counter.counts.clear()
    items: list[tuple] = []
    for item in src:
        items.append(item)
        if len(items) == batch_size:
            images, tokens, captions = zip(*items)
            batch = torch.from_numpy(np.stack([im.numpy() for im in images]))  # numpy: see augment()
            yield batch, torch.stack(tokens), list(captions), worker, dict(counter.counts)
            items = []
    # A partial last batch is dropped (batches must stack; every rank must take equal steps), but
    # counted; a final marker carries the counts made after this worker's last batch.
    if items:
        counter.skip(PARTIAL_BATCH, len(items))
    yield _END, None, None, worker, dict(counter.counts)


# --- the loader ------------------------------------------------------------------------------------------
class Loader:
    """Iterable of (images, tokens, captions); updates ``stats`` as batches arrive.

    Each ``iter()`` is one epoch: the non-resampled shard order is reshuffled per epoch. The epoch is
    set here, in the main process, because DataLoader workers run on copies of the pipeline.
    """

    def __init__(self, dataloader: torch.utils.data.DataLoader, stats: LoaderStats, shard_order: _ShardOrder | None) -> None:
        self.dataloader, self.stats, self.shard_order = dataloader, stats, shard_order
        self.epoch = -1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        self.epoch += 1
        if self.shard_order is not None:
            self.shard_order.epoch = self.epoch
        for images, tokens, captions, worker, counts in self.dataloader:
            self.stats.update(self.epoch, int(worker), counts)
            if isinstance(images, str) and images == _END:
                continue
            yield images, tokens, captions


class _ShardOrder(torch.utils.data.IterableDataset):
    """Shard list in a seeded order that changes per epoch and is the same on every rank, so that
    splitting it by rank and then by worker gives disjoint parts that cover every shard."""

    def __init__(self, urls: list[str], seed: int) -> None:
        super().__init__()
        self.urls, self.seed, self.epoch = urls, seed, 0

    def __iter__(self) -> Iterator[dict[str, str]]:
        order = list(self.urls)
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        for url in order:
            yield {"url": url}


def check_even_split(n_shards: int, world_size: int, workers: int) -> None:
    parts = world_size * max(workers, 1)
    if n_shards % parts:
        raise ShardSplitError(
            f"{n_shards} shards cannot be split evenly over {world_size} ranks x {max(workers, 1)} workers "
            f"({parts} parts): ranks would take different numbers of steps and DDP would hang. Use "
            "data.resampled=true, or re-shard to a multiple of ranks x workers, or change data.workers."
        )


def build_loader(
    data_cfg: DataConfig,
    tokenize: Callable[[Sequence[str]], torch.Tensor],
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shards: str | None = None,
    epoch_samples: int = 0,
) -> tuple[Loader, LoaderStats]:
    """A DataLoader over the shards: endless with ``data.resampled``, else one pass split over ranks.

    ``epoch_samples`` > 0 (resampled only) ends each ``iter()`` after that many samples over all
    ranks, the same number of batches on every rank (webdataset's ``with_epoch``).
    """
    import webdataset as wds

    urls = resolve_shards(data_cfg, shards)
    if any(u.startswith("s3://") for u in urls):
        _register_s3_gopen(data_cfg.s3_endpoint_url)
    counter = _SkipCounter(data_cfg.max_skip_fraction)
    shard_order = None
    if data_cfg.resampled:
        # Every rank and worker draws shards with replacement from its own seeded stream: no
        # divisibility constraint and every rank takes the same number of steps.
        source = [wds.ResampledShards(urls, seed=seed + rank * 1_000_003, deterministic=True)]
    else:
        if epoch_samples:
            raise ValueError("epoch_samples needs data.resampled=true (a non-resampled epoch is one pass over the shards)")
        check_even_split(len(urls), world_size, data_cfg.workers)
        shard_order = _ShardOrder(urls, seed)
        source = [shard_order, _split_by_rank(rank, world_size), wds.split_by_worker]
    stages = [
        *source,
        wds.tarfile_to_samples(handler=counter.handler),
        lambda src: _shuffle(src, data_cfg.shuffle_buffer, seed),
        lambda src: _prepare(src, data_cfg, tokenize, counter, seed),
        lambda src: _batch(src, batch_size, counter),
    ]
    pipeline = wds.DataPipeline(*stages)
    if epoch_samples:
        per_worker = world_size * batch_size * max(data_cfg.workers, 1)
        pipeline = pipeline.with_epoch(nbatches=max(1, -(-epoch_samples // per_worker)))
    dataloader = torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,
        num_workers=data_cfg.workers,
        # a dedicated generator: worker seeding must not consume (or depend on) the global RNG
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    stats = LoaderStats()
    return Loader(dataloader, stats, shard_order), stats


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
            batches = self._virtual_pipeline(segment_seed(self.seed, self.rank, seg_start), virtual, n_workers, counter)
            try:
                for images, tokens, captions in islice(batches, first, stop):
                    yield images, tokens, captions, worker, dict(counter.counts)
            finally:
                batches.close()
            served += per_segment - skip
            seg_start, skip = seg_start + plan.segment_steps, 0

    def _virtual_pipeline(self, seed: int, virtual: int, n_virtual: int, counter: _SkipCounter) -> Iterator[tuple]:
        """Batches of one virtual worker, pass after pass (a non-resampled pass ends; the next begins)."""
        import webdataset as wds

        cfg, rank = self.data_cfg, self.rank
        for epoch in itertools.count():
            if cfg.resampled:
                source = [functools.partial(_resampled_urls, self.urls, seed * 1_000_003 + rank * 7_919 + virtual)]
            else:
                order = _ShardOrder(self.urls, seed)
                order.epoch = epoch
                source = [order, _split_by_rank(rank, self.world_size), _split_by_rank(virtual, n_virtual)]
            pass_seed = seed + epoch * 104_723
            pipeline = wds.DataPipeline(
                *source,
                wds.tarfile_to_samples(handler=counter.handler),
                lambda src: _shuffle(src, cfg.shuffle_buffer, pass_seed, rank, virtual),
                lambda src: _prepare(src, cfg, self.tokenize, counter, pass_seed, rank, virtual),
                lambda src: _batch(src, self.batch_size, counter, per_pass=False),
            )
            produced = False
            for images, tokens, captions, _, _ in pipeline:
                if isinstance(images, str) and images == _END:
                    continue
                produced = True
                yield images, tokens, captions
            if not produced:
                raise RuntimeError(
                    f"a full pass over {len(self.urls)} shard(s) gave no usable batch of {self.batch_size} "
                    f"(skipped: {dict(counter.counts)}); check data.shards_dir and the data report"
                )


def _resampled_urls(urls: list[str], seed: int) -> Iterator[dict[str, str]]:
    # Shards drawn with replacement from a seeded stream (webdataset's ResampledShards seeds from the
    # DataLoader worker, but here the virtual worker decides).
    rng = random.Random(seed)
    while True:
        yield {"url": rng.choice(urls)}


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
) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], LoaderStats]:
    """Endless (images, tokens) micro-batches for the trainer from one DataLoader that lives as long
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

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, tokens, _captions, worker, counts in loader:
            stats.update(0, int(worker), counts)
            yield images, tokens

    return batches(), stats

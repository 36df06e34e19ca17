"""The training stream (galip.data.loader.training_stream, what the trainer reads) on real webdataset shards:
corrupt samples, rank x worker splits, pass order, S3, fail-fast."""

from __future__ import annotations

import functools
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_shards
from PIL import Image

from galip.model.clip import load_clip
from galip.config import load_config
from galip.data.loader import DataQualityError, ShardSplitError, StreamPlan, training_stream


@functools.cache
def _tokenizer():
    return load_clip("galip-tiny").tokenizer


def cfg_for(shards: Path | str, *extra: str):
    return load_config("params.yaml", [f"data.shards_dir={shards}", "data.workers=0", "data.shuffle_buffer=4", *extra], profile="demo")


def stream(cfg, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
    """The trainer's stream with one segment longer than any test reads (no segment boundary)."""
    return training_stream(cfg.data, _tokenizer(), batch_size, seed=seed, plan=StreamPlan(0, 10_000), rank=rank, world_size=world_size)


def captions(batches, n: int) -> list[str]:
    return [c for _ in range(n) for c in next(batches)[2]]


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "good-and-bad.tar", "w") as tar:
        for i in range(6):
            _add(tar, f"{i:04d}.jpg", _jpeg(i))
            _add(tar, f"{i:04d}.txt", f"caption {i}".encode())
        _add(tar, "0100.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")  # bad JPEG
        _add(tar, "0100.txt", b"bad image")
        _add(tar, "0101.jpg", _jpeg(101))  # no caption
        _add(tar, "0102.jpg", _jpeg(102)[:200])  # truncated JPEG
        _add(tar, "0102.txt", b"truncated image")
    # a tar cut off in the middle of a member
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for i in range(200, 204):
            _add(tar, f"{i:04d}.jpg", _jpeg(i))
            _add(tar, f"{i:04d}.txt", f"caption {i}".encode())
    with tarfile.open(fileobj=io.BytesIO(whole.getvalue())) as tar:
        cut = tar.getmember("0202.jpg").offset_data + 100  # in the middle of a member's data
    (shards / "truncated.tar").write_bytes(whole.getvalue()[:cut])

    # no shuffle buffer: every unusable member comes after the good ones of its tar, so the first batch of
    # the second pass carries exactly the first pass's counts
    batches, stats = stream(cfg_for(shards, "data.resampled=false", "data.shuffle_buffer=0"), 1)
    good = {f"caption {i}" for i in (0, 1, 2, 3, 4, 5, 200, 201)}  # 200, 201 precede the cut
    first_pass = captions(batches, 8)
    assert set(first_pass) == good and len(first_pass) == len(good)
    assert next(batches)[2][0] in good
    reasons = stats.reasons
    assert reasons["missing_caption"] == 1
    assert sum(v for k, v in reasons.items() if k.startswith("bad_image")) == 2
    # the cut-off member is reported (webdataset surfaces it once per tar layer that notices it)
    assert reasons["ReadError"] >= 1
    assert stats.skipped == 3 + reasons["ReadError"]


@pytest.mark.parametrize("workers", [0, 2])
def test_rank_and_worker_splits_are_disjoint_and_cover_everything_in_each_pass(tmp_path, workers):
    shards = write_shards(tmp_path / "s", n_samples=64, per_shard=8, unique=True)  # 8 shards
    cfg = cfg_for(shards, "data.resampled=false", f"data.workers={workers}")
    passes = []  # per rank: two passes of 32 samples = 8 batches of 4
    for rank in range(2):
        batches, _ = stream(cfg, 4, rank=rank, world_size=2)
        passes.append([captions(batches, 8), captions(batches, 8)])
    for p in range(2):
        seen = [passes[0][p], passes[1][p]]
        assert len(seen[0]) == len(set(seen[0])) == 32 and len(seen[1]) == len(set(seen[1])) == 32
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == 64


def test_uneven_shards_fail_fast_with_advice(tmp_path):
    shards = write_shards(tmp_path / "s", n_samples=24, per_shard=8)  # 3 shards
    cfg = cfg_for(shards, "data.resampled=false", "data.workers=1")
    with pytest.raises(ShardSplitError, match="data.resampled=true"):
        stream(cfg, 4, rank=0, world_size=2)


def test_resampled_shards_need_no_even_split_and_differ_between_ranks(tmp_path):
    shards = write_shards(tmp_path / "s", n_samples=24, per_shard=8, unique=True)  # 3 shards, 2 ranks
    cfg = cfg_for(shards)
    per_rank = [captions(stream(cfg, 4, rank=rank, world_size=2)[0], 6) for rank in range(2)]
    assert per_rank[0] != per_rank[1]
    assert captions(stream(cfg, 4, rank=1, world_size=2)[0], 6) == per_rank[1]  # reproducible from (seed, rank)


def test_batches_have_the_training_shapes_and_range(tmp_path):
    shards = write_shards(tmp_path / "s", n_samples=16, per_shard=8)
    images, tokens, caps = next(stream(cfg_for(shards), 4)[0])
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.min() < 0 < images.max()
    context_length = _tokenizer()(["x"]).shape[1]  # galip-tiny's text_cfg.context_length
    assert tokens.shape == (4, context_length) and tokens.dtype == torch.long and len(caps) == 4


def test_reference_augmentation_crops_and_flips(tmp_path):
    shards = write_shards(tmp_path / "s", n_samples=16, per_shard=8)
    cfg = cfg_for(shards, "data.load_size=76", "data.crop_size=64", "data.hflip=true", "data.resampled=false")
    a, b = (next(stream(cfg, 4, seed=seed)[0])[0] for seed in (1, 2))
    assert a.shape[-1] == 64 and not torch.equal(a, b)  # random crops/flips differ between seeds


@pytest.mark.slow
def test_reads_shards_from_s3(tmp_path, s3_bucket):
    import boto3

    endpoint, bucket = s3_bucket
    shards = write_shards(tmp_path / "s", n_samples=16, per_shard=8, unique=True)
    client = boto3.client("s3", endpoint_url=endpoint)
    for tar in shards.glob("*.tar"):
        client.upload_file(str(tar), bucket, f"shards/{tar.name}")
    cfg = cfg_for(f"s3://{bucket}/shards", "data.resampled=false", f"data.s3_endpoint_url={endpoint}")
    seen = captions(stream(cfg, 4)[0], 4)
    assert len(seen) == 16 == len(set(seen))


def test_skips_are_summed_over_workers_and_partial_batches_counted(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):  # one shard per worker, each with one corrupt image after its 5 good ones
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(5):
                _add(tar, f"{s}{i:03d}.jpg", _jpeg(i))
                _add(tar, f"{s}{i:03d}.txt", f"caption {s}-{i}".encode())
            _add(tar, f"{s}900.jpg", b"not a jpeg")
            _add(tar, f"{s}900.txt", b"bad")
    cfg = cfg_for(shards, "data.resampled=false", "data.workers=2", "data.shuffle_buffer=0")
    batches, stats = stream(cfg, 2)
    # a pass: 5 good per worker -> 2 full batches each, 1 left over each; a worker's counts reach the
    # main process with its next batch, the first of the next pass
    assert len(captions(batches, 4)) == 8 and (stats.skipped, stats.dropped) == (0, 0)
    captions(batches, 2)
    reasons = stats.reasons
    assert sum(v for k, v in reasons.items() if k.startswith("bad_image")) == 2
    assert reasons["partial_last_batch"] == 2 and stats.skipped == 2 and stats.dropped == 2
    captions(batches, 4)  # the next pass adds its own counts
    assert (stats.skipped, stats.dropped) == (4, 4)


def test_shard_order_is_shuffled_per_pass_and_shared_by_ranks(tmp_path):
    shards = write_shards(tmp_path / "s", n_samples=32, per_shard=2, unique=True)  # 16 shards
    cfg = cfg_for(shards, "data.resampled=false", "data.shuffle_buffer=0")
    ranks = [stream(cfg, 2, seed=5, rank=r, world_size=2)[0] for r in range(2)]
    passes = [[captions(batches, 8) for batches in ranks] for _ in range(2)]  # 16 samples per rank and pass
    for pair in passes:  # each pass: disjoint halves that cover everything
        assert not set(pair[0]) & set(pair[1]) and len(set(pair[0]) | set(pair[1])) == 32
    assert passes[0][0] != passes[1][0]  # the shard order changed between passes
    again = stream(cfg, 2, seed=5, rank=0, world_size=2)[0]
    assert captions(again, 8) == passes[0][0]  # reproducible from (seed, rank)


@pytest.mark.parametrize("workers", [0, 1])
def test_unusable_data_stops_with_a_clear_error_instead_of_spinning(tmp_path, workers):
    """Resampled shards of corrupt JPEGs never end a pass: past data.max_skip_fraction the stream
    raises (from a worker too) instead of drawing shards forever without a batch."""
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "bad.tar", "w") as tar:
        for i in range(30):
            _add(tar, f"{i:04d}.jpg", b"\xff\xd8\xff\xe0 not a jpeg %d" % i)
            _add(tar, f"{i:04d}.txt", f"caption {i}".encode())
        _add(tar, "9999.jpg", _jpeg(9))  # one good sample: the rate, not a total failure, trips it
        _add(tar, "9999.txt", b"good")
    cfg = cfg_for(shards, f"data.workers={workers}", "data.max_skip_fraction=0.5")
    batches, _ = stream(cfg, 4)
    with pytest.raises(DataQualityError, match="data.max_skip_fraction=0.5"):
        next(batches)

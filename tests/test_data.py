"""The training loader on real webdataset shards: corrupt samples, rank x worker splits, S3, fail-fast."""

from __future__ import annotations

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
from galip.data.loader import ShardSplitError, build_loader


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip("galip-tiny").tokenizer


def cfg_for(shards: Path | str, *extra: str):
    return load_config("params.yaml", [f"data.shards_dir={shards}", "data.workers=0", "data.shuffle_buffer=4", *extra], profile="demo")


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_are_skipped_and_counted(tmp_path, tokenizer):
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

    loader, stats = build_loader(cfg_for(shards, "data.resampled=false").data, tokenizer, 1, seed=0)
    captions = [c for _, _, caps in loader for c in caps]
    good = {f"caption {i}" for i in (0, 1, 2, 3, 4, 5, 200, 201)}  # 200, 201 precede the cut
    assert set(captions) == good and len(captions) == len(good)
    reasons = stats.reasons
    assert reasons["missing_caption"] == 1
    assert sum(v for k, v in reasons.items() if k.startswith("bad_image")) == 2
    # the cut-off member is reported (webdataset surfaces it once per tar layer that notices it)
    assert reasons["ReadError"] >= 1
    assert stats.skipped == 3 + reasons["ReadError"]


@pytest.mark.parametrize("workers", [0, 2])
def test_rank_and_worker_splits_are_disjoint_and_cover_everything(tmp_path, tokenizer, workers):
    shards = write_shards(tmp_path / "s", n_samples=64, per_shard=8, unique=True)  # 8 shards
    cfg = cfg_for(shards, "data.resampled=false", f"data.workers={workers}")
    seen = []
    for rank in range(2):
        loader, _ = build_loader(cfg.data, tokenizer, 4, seed=0, rank=rank, world_size=2)
        seen.append([c for _, _, caps in loader for c in caps])
    assert len(seen[0]) == len(set(seen[0])) == 32 and len(seen[1]) == len(set(seen[1])) == 32
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 64


def test_uneven_shards_fail_fast_with_advice(tmp_path, tokenizer):
    shards = write_shards(tmp_path / "s", n_samples=24, per_shard=8)  # 3 shards
    cfg = cfg_for(shards, "data.resampled=false", "data.workers=1")
    with pytest.raises(ShardSplitError, match="data.resampled=true"):
        build_loader(cfg.data, tokenizer, 4, seed=0, rank=0, world_size=2)


def test_batches_have_the_training_shapes_and_range(tmp_path, tokenizer):
    shards = write_shards(tmp_path / "s", n_samples=16, per_shard=8)
    loader, _ = build_loader(cfg_for(shards).data, tokenizer, 4, seed=0)
    images, tokens, captions = next(iter(loader))
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.min() < 0 < images.max()
    context_length = tokenizer(["x"]).shape[1]  # galip-tiny's text_cfg.context_length
    assert tokens.shape == (4, context_length) and tokens.dtype == torch.long and len(captions) == 4


def test_reference_augmentation_crops_and_flips(tmp_path, tokenizer):
    shards = write_shards(tmp_path / "s", n_samples=16, per_shard=8)
    cfg = cfg_for(shards, "data.load_size=76", "data.crop_size=64", "data.hflip=true", "data.resampled=false")
    a = torch.cat([b[0] for b in build_loader(cfg.data, tokenizer, 4, seed=1)[0]])
    b = torch.cat([b[0] for b in build_loader(cfg.data, tokenizer, 4, seed=2)[0]])
    assert a.shape[-1] == 64 and not torch.equal(a, b)  # random crops/flips differ between seeds


@pytest.mark.slow
def test_reads_shards_from_s3(tmp_path, tokenizer, s3_bucket):
    import boto3

    endpoint, bucket = s3_bucket
    shards = write_shards(tmp_path / "s", n_samples=16, per_shard=8, unique=True)
    client = boto3.client("s3", endpoint_url=endpoint)
    for tar in shards.glob("*.tar"):
        client.upload_file(str(tar), bucket, f"shards/{tar.name}")
    cfg = cfg_for(f"s3://{bucket}/shards", "data.resampled=false", f"data.s3_endpoint_url={endpoint}")
    captions = [c for _, _, caps in build_loader(cfg.data, tokenizer, 4, seed=0)[0] for c in caps]
    assert len(captions) == 16 == len(set(captions))


def test_skips_are_summed_over_workers_and_partial_batches_counted(tmp_path, tokenizer):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):  # one shard per worker, each with one corrupt image
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(5):
                _add(tar, f"{s}{i:03d}.jpg", _jpeg(i))
                _add(tar, f"{s}{i:03d}.txt", f"caption {s}-{i}".encode())
            _add(tar, f"{s}900.jpg", b"not a jpeg")
            _add(tar, f"{s}900.txt", b"bad")
    cfg = cfg_for(shards, "data.resampled=false", "data.workers=2")
    loader, stats = build_loader(cfg.data, tokenizer, 2, seed=0)
    captions = [c for _, _, caps in loader for c in caps]
    assert len(captions) == 8  # 5 good per worker -> 2 full batches each, 1 left over each
    reasons = stats.reasons
    assert sum(v for k, v in reasons.items() if k.startswith("bad_image")) == 2
    assert reasons["partial_last_batch"] == 2 and stats.skipped == 2 and stats.dropped == 2
    # a second epoch adds its own counts (new worker processes start from zero)
    assert len([c for _, _, caps in loader for c in caps]) == 8 and (stats.skipped, stats.dropped) == (4, 4)


def test_shard_order_is_shuffled_per_epoch_and_shared_by_ranks(tmp_path, tokenizer):
    shards = write_shards(tmp_path / "s", n_samples=32, per_shard=2, unique=True)  # 16 shards
    cfg = cfg_for(shards, "data.resampled=false", "data.shuffle_buffer=0")
    loaders = [build_loader(cfg.data, tokenizer, 2, seed=5, rank=r, world_size=2)[0] for r in range(2)]
    epochs = [[[c for _, _, caps in loader for c in caps] for loader in loaders] for _ in range(2)]
    for ranks in epochs:  # each epoch: disjoint halves that cover everything
        assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == 32
    assert epochs[0][0] != epochs[1][0]  # the shard order changed between epochs
    again = build_loader(cfg.data, tokenizer, 2, seed=5, rank=0, world_size=2)[0]
    assert [c for _, _, caps in again for c in caps] == epochs[0][0]  # reproducible from (seed, rank)


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_epochs_are_even_across_ranks(tmp_path, tokenizer, workers):
    shards = write_shards(tmp_path / "s", n_samples=24, per_shard=8)  # 3 shards: no even split
    cfg = cfg_for(shards, f"data.workers={workers}")
    counts = []
    for rank in range(2):
        loader, _ = build_loader(cfg.data, tokenizer, 4, seed=0, rank=rank, world_size=2, epoch_samples=40)
        counts.append(sum(1 for _ in loader))
    assert counts[0] == counts[1] >= 40 / (2 * 4)
    with pytest.raises(ValueError, match="resampled"):
        build_loader(cfg_for(shards, "data.resampled=false").data, tokenizer, 4, seed=0, epoch_samples=40)


@pytest.mark.parametrize("workers", [0, 1])
def test_unusable_data_stops_with_a_clear_error_instead_of_spinning(tmp_path, tokenizer, workers):
    """Resampled shards of corrupt JPEGs never end a pass: past data.max_skip_fraction the stream
    raises (from a worker too) instead of drawing shards forever without a batch."""
    from galip.data.loader import DataQualityError, StreamPlan, training_stream

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "bad.tar", "w") as tar:
        for i in range(30):
            _add(tar, f"{i:04d}.jpg", b"\xff\xd8\xff\xe0 not a jpeg %d" % i)
            _add(tar, f"{i:04d}.txt", f"caption {i}".encode())
        _add(tar, "9999.jpg", _jpeg(9))  # one good sample: the rate, not a total failure, trips it
        _add(tar, "9999.txt", b"good")
    cfg = cfg_for(shards, f"data.workers={workers}", "data.max_skip_fraction=0.5")
    stream, _ = training_stream(cfg.data, tokenizer, 4, seed=0, plan=StreamPlan(0, 10))
    with pytest.raises(DataQualityError, match="data.max_skip_fraction=0.5"):
        next(stream)

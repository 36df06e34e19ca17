"""Real img2dataset runs over HTTP on 127.0.0.1, list conversion, report and manifest."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from galip.config import load_config
from galip.data.download import (
    StaleShardsError,
    UrlListError,
    failure_reason,
    incomplete_shards,
    prepare_url_list,
    run,
    shard_store,
    verify_manifest,
)

N_IMAGES = 60


def demo_cfg(root: Path, *extra: str):
    return load_config("params.yaml", [
        f"data.url_list={root / 'demo/urls.parquet'}", f"data.shards_dir={root / 'demo/shards'}",
        f"data.manifest={root / 'demo/manifest.json'}", f"data.report={root / 'demo/data_report.json'}",
        f"data.demo_images={N_IMAGES}", "data.demo_broken=true", "data.samples_per_shard=20",
        "data.processes=1", "data.threads=8", *extra,
    ], profile="demo")


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("dl")
    cfg = demo_cfg(root)
    return root, cfg, run(cfg)


@pytest.mark.slow
def test_img2dataset_over_loopback_counts_every_broken_entry(downloaded):
    root, _, report = downloaded
    assert report["rows"] == N_IMAGES + 5 and report["successes"] == N_IMAGES and report["failed"] == 5
    reasons = report["failure_reasons"]
    assert sum(reasons.values()) == 5
    assert reasons == {
        "HTTP Error 404: File not found": 1,
        "<urlopen error [Errno 111] Connection refused>": 1,
        "Image decoding error": 2,  # HTML served as .jpg, truncated JPEG
        "OpenCV error: (-215:Assertion failed) !buf.empty() in function 'imdecode_'": 1,  # empty file
    }
    # HTML served as .jpg, a truncated JPEG and an empty file all fail to decode
    assert report["failed_to_resize"] == 3 and report["failed_to_download"] == 2
    assert report["success_rate"] == pytest.approx(N_IMAGES / (N_IMAGES + 5), abs=1e-4)
    saved = json.loads((root / "demo/data_report.json").read_text())
    assert saved["successes"] == N_IMAGES and saved["manifest_hash"] == report["manifest_hash"]


@pytest.mark.slow
def test_shards_and_manifest_agree(downloaded):
    root, _, report = downloaded
    manifest = json.loads(Path(report["manifest"]).read_text())
    assert manifest["samples"] == N_IMAGES
    for entry in manifest["shards"]:
        with tarfile.open(root / "demo/shards" / entry["shard"]) as tar:
            names = tar.getnames()
        assert sum(n.endswith(".jpg") for n in names) == entry["samples"]
        assert sum(n.endswith(".txt") for n in names) == entry["samples"]
        assert len(entry["sha256"]) == 64 and entry["bytes"] > 0


@pytest.mark.slow
def test_training_stream_reads_the_downloaded_shards(downloaded):
    from galip.model.clip import load_clip
    from galip.data.loader import StreamPlan, training_stream
    from galip.data.demo_data import parse_caption

    root, cfg, _ = downloaded
    data = cfg.data.model_copy(update={"resampled": False, "workers": 0})
    stream, stats = training_stream(data, load_clip("galip-tiny").tokenizer, 10, seed=0, plan=StreamPlan(0, 1000))
    batches = [next(stream) for _ in range(N_IMAGES // 10 + 1)]  # one pass and the first batch of the next
    captions = [c for _, _, caps in batches[:-1] for c in caps]
    in_tars = []
    for shard in sorted((root / "demo/shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            in_tars += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    assert len(in_tars) == N_IMAGES and sorted(captions) == sorted(in_tars) and stats.skipped == 0  # each once
    assert all(parse_caption(c) for c in captions)  # demo captions survive the round trip intact
    assert batches[0][0].shape == (10, 3, cfg.data.crop_size, cfg.data.crop_size)


@pytest.mark.slow
def test_interrupted_run_resumes_without_duplicate_or_partial_shards(downloaded):
    root, cfg, report = downloaded
    shards = root / "demo/shards"
    before = {e["shard"]: e for e in json.loads(Path(report["manifest"]).read_text())["shards"]}
    # img2dataset died half way through shard 1: tar cut short, stats (written last) never written
    victim = shards / "00001.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (shards / "00001_stats.json").unlink()
    assert incomplete_shards(*shard_store(cfg.data)) == ["00001.tar"]

    again = run(cfg)
    after = {e["shard"]: e for e in json.loads(Path(again["manifest"]).read_text())["shards"]}
    assert again["incomplete_shards"] == [] and again["successes"] == N_IMAGES and again["failed"] == 5
    assert after.keys() == before.keys() and after["00001.tar"]["samples"] == before["00001.tar"]["samples"]
    # finished shards were not fetched again (same bytes); only the cut one was redone, whole
    assert all(after[n]["sha256"] == before[n]["sha256"] for n in before if n != "00001.tar")
    keys = []
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            keys += [n.split(".")[0] for n in tar.getnames() if n.endswith(".jpg")]
    assert len(keys) == len(set(keys)) == N_IMAGES


@pytest.mark.slow
def test_resuming_with_other_settings_is_refused(downloaded):
    root, _, _ = downloaded
    changed = demo_cfg(root, "data.image_size=32")
    with pytest.raises(StaleShardsError, match="image_size") as err:
        run(changed)
    assert "data.shards_dir" in str(err.value)
    assert len(list((root / "demo/shards").glob("*.tar"))) == 4  # nothing was touched


@pytest.mark.slow
def test_shards_written_to_s3_are_pinned_by_the_manifest_and_verified(tmp_path, s3_bucket, downloaded):
    """The production layout: img2dataset writes to an s3:// prefix, the local manifest pins each shard's
    sha256, training reads the shards it lists, and `galip verify-data` fetches and checks them."""
    import boto3

    from galip.cli import main
    from galip.data.loader import resolve_shards

    endpoint, bucket = s3_bucket
    prefix = f"s3://{bucket}/galip/shards"
    cfg = demo_cfg(tmp_path, f"data.shards_dir={prefix}", f"data.s3_endpoint_url={endpoint}")
    report = run(cfg)
    assert report["successes"] == N_IMAGES and report["shards_dir"] == prefix
    manifest = json.loads(Path(report["manifest"]).read_text())
    assert manifest["shards_dir"] == prefix and len(report["manifest_md5"]) == 32
    assert resolve_shards(cfg.data) == [f"{prefix}/{s['shard']}" for s in manifest["shards"]]
    checked = verify_manifest(Path(report["manifest"]), endpoint, copy_to=tmp_path / "copy")
    assert checked["verified"] == checked["shards"] == len(manifest["shards"]) and not checked["mismatches"]
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [s["shard"] for s in manifest["shards"]]

    # a shard changed after the manifest was written: verification names it and the command exits 2
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.put_object(Bucket=bucket, Key="galip/shards/00000.tar", Body=b"not the shard")
    assert main(["verify-data", "--manifest", report["manifest"], "-S", f"data.s3_endpoint_url={endpoint}"]) == 2
    assert verify_manifest(Path(report["manifest"]), endpoint)["mismatches"][0].startswith(f"{prefix}/00000.tar")


def test_failure_reasons_are_one_readable_line():
    opencv = ("OpenCV(4.14.0) /io/opencv/modules/imgcodecs/src/loadsave.cpp:1310: error: (-215:Assertion failed) "
              "!buf.empty() in function 'imdecode_'\n")
    assert failure_reason(opencv) == "OpenCV error: (-215:Assertion failed) !buf.empty() in function 'imdecode_'"
    assert failure_reason("HTTP Error 404: File not found") == "HTTP Error 404: File not found"
    assert failure_reason("first line\nsecond line") == "first line"


def test_list_is_streamed_in_bounded_parts(tmp_path, monkeypatch):
    import galip.data.download as dl

    monkeypatch.setattr(dl, "PART_ROWS", 4)  # as if the list were millions of rows long
    tsv = tmp_path / "list.tsv"
    tsv.write_text("".join(f"http://127.0.0.1:1/{i}.jpg\tcaption {i}\n" for i in range(10)))
    cfg = load_config("params.yaml", [f"data.url_list={tsv}"], profile="cc12m")
    stats = prepare_url_list(cfg.data, tmp_path / "parts")
    parts = sorted((tmp_path / "parts").glob("part-*.parquet"))
    import pandas as pd

    assert [len(pd.read_parquet(p)) for p in parts] == [4, 4, 2] and stats.rows == 10
    assert pd.concat(pd.read_parquet(p) for p in parts)["caption"].tolist() == [f"caption {i}" for i in range(10)]


def test_headerless_tsv_keeps_every_good_row(tmp_path):
    tsv = tmp_path / "cc12m.tsv"
    lines = [
        "https://example.invalid/a.jpg\ta plain caption",
        'https://example.invalid/b.jpg\t"quoted at the start, never closed',
        "https://example.invalid/c.jpg\tunicode caption: café — 東京 🚀",
        "https://example.invalid/d.jpg\tcaption with\tan extra tab",
        "https://example.invalid/e.jpg\tcaption after the bad row \"with quotes\"",
        "\tno url",
        "https://example.invalid/f.jpg\t",
        "images/relative.jpg\ta URL without a scheme",
        "/abs/g.jpg\ta local file",
    ]
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = load_config("params.yaml", [f"data.url_list={tsv}"], profile="cc12m")
    stats = prepare_url_list(cfg.data, tmp_path / "parts")
    import pandas as pd

    rows = pd.read_parquet(tmp_path / "parts")
    assert list(rows["url"].str[-5:]) == ["a.jpg", "b.jpg", "c.jpg", "e.jpg", "f.jpg", "g.jpg"]
    assert rows["url"].iloc[-1] == "file:///abs/g.jpg"
    assert rows["caption"].tolist()[1] == '"quoted at the start, never closed'
    assert rows["caption"].tolist()[2] == "unicode caption: café — 東京 🚀"
    assert (stats.rows, stats.malformed, stats.malformed_lines) == (6, 3, [4, 6, 8])


def test_missing_list_names_the_key(tmp_path):
    cfg = load_config("params.yaml", [f"data.url_list={tmp_path / 'nope.tsv'}"], profile="cc12m")
    with pytest.raises(UrlListError, match="data.url_list"):
        prepare_url_list(cfg.data, tmp_path / "parts")


def test_list_conversion_memory_does_not_grow_with_the_list(tmp_path, monkeypatch):
    import tracemalloc

    import galip.data.download as dl

    monkeypatch.setattr(dl, "PART_ROWS", 5_000)

    def peak_for(n_rows: int) -> int:
        tsv = tmp_path / f"{n_rows}.tsv"
        with open(tsv, "w") as fh:
            fh.writelines(f"https://example.invalid/{i:09d}.jpg\tcaption number {i} with some words in it\n" for i in range(n_rows))
        cfg = load_config("params.yaml", [f"data.url_list={tsv}"], profile="cc12m")
        tracemalloc.start()
        stats = prepare_url_list(cfg.data, tmp_path / f"parts-{n_rows}")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert stats.rows == n_rows
        return peak

    peak_for(1_000)  # first call: one-off import and config allocations
    small, large = peak_for(20_000), peak_for(200_000)
    assert large < 1.5 * small, (small, large)  # 10x the rows, about the same peak

"""Real img2dataset runs over HTTP on 127.0.0.1, list conversion, report and manifest."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from galip.config import load_config
from galip.download import build_manifest, prepare_url_list, run

N_IMAGES = 60


def demo_cfg(root: Path, *extra: str):
    return load_config("params.yaml", [
        f"data.url_list={root / 'demo/urls.parquet'}", f"data.shards_dir={root / 'demo/shards'}",
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
    root, cfg, report = downloaded
    assert report["rows"] == N_IMAGES + 5 and report["successes"] == N_IMAGES and report["failed"] == 5
    reasons = report["failure_reasons"]
    assert sum(reasons.values()) == 5
    assert reasons.get("HTTP Error 404: File not found") == 1
    assert sum(v for k, v in reasons.items() if "Connection refused" in k) == 1
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
def test_rerun_is_incremental_without_duplicates(downloaded):
    root, cfg, report = downloaded
    shards = root / "demo/shards"
    # an interrupted run: one shard lost its stats file (img2dataset writes it last)
    victim = sorted(shards.glob("*_stats.json"))[0]
    victim.unlink()
    again = run(cfg)
    assert again["successes"] == N_IMAGES and again["shards"] == report["shards"]
    assert build_manifest(shards)["shards"] == json.loads(Path(report["manifest"]).read_text())["shards"]


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
    ]
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = load_config("params.yaml", [f"data.url_list={tsv}"], profile="cc12m")
    stats = prepare_url_list(cfg.data, tmp_path / "parts")
    import pandas as pd

    rows = pd.read_parquet(tmp_path / "parts")
    assert list(rows["url"].str[-5:]) == ["a.jpg", "b.jpg", "c.jpg", "e.jpg", "f.jpg"]
    assert rows["caption"].tolist()[1] == '"quoted at the start, never closed'
    assert rows["caption"].tolist()[2] == "unicode caption: café — 東京 🚀"
    assert (stats.rows, stats.malformed, stats.malformed_lines) == (5, 2, [4, 6])


def test_missing_list_names_the_key(tmp_path):
    cfg = load_config("params.yaml", [f"data.url_list={tmp_path / 'nope.tsv'}"], profile="cc12m")
    with pytest.raises(FileNotFoundError, match="data.url_list"):
        prepare_url_list(cfg.data, tmp_path / "parts")

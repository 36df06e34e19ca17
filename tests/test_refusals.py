"""Refused commands: one `error:` line, exit code 2, before any work, and the file system as it was.

Every row is a mistake a user makes; the CLI runs in-process (as `galip` does) against a scratch folder
whose every file (name, size, bytes) is compared before and after.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from galip.cli import main
from galip.data.download import check_fingerprint
from galip.config import load_config
from galip.train.checkpoint import list_checkpoints
from galip.train.trainer import run

from helpers import set_args, tiny_config, tiny_overrides, write_shards

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its bytes ('' for folders)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


def _train(tmp: Path, shards: Path, *extra: str) -> list[str]:
    return ["train", "--profile", "demo", *set_args(tiny_overrides(tmp, shards, *extra))]


def _download(tmp: Path, *extra: str) -> list[str]:
    return ["download", "--profile", "cc12m", *set_args([f"data.shards_dir={tmp / 'data/shards'}", *extra])]


# (row id, argv builder (scratch folder, shards) -> argv, words the error line must hold)
ROWS = [
    ("image_size_below_grid", lambda t, s: _train(t, s, "model.image_size=8"), "must exceed the CLIP patch grid"),
    ("feature_block_out_of_range", lambda t, s: _train(t, s, "model.feature_blocks=[99]"), "model.feature_blocks=[99]"),
    ("unknown_clip_model", lambda t, s: _train(t, s, "model.clip_model=nope"), "not an open_clip model name"),
    ("missing_clip_file", lambda t, s: _train(t, s, f"model.clip_pretrained={t / 'clip.pt'}"), "no such file"),
    ("shards_folder_missing", lambda t, s: _train(t, s, f"data.shards_dir={t / 'nowhere'}"), "no .tar shards"),
    ("shards_folder_empty", lambda t, s: _train(t, s, f"data.shards_dir={t / 'empty'}"), "no .tar shards"),
    ("uneven_shards", lambda t, s: _train(t, s, "data.resampled=false", "data.workers=3"), "cannot be split evenly"),
    pytest.param("train_on_cuda_without_gpu", lambda t, s: _train(t, s, "train.device=cuda"), "no CUDA device", marks=NO_GPU),
    ("device_banana", lambda t, s: _train(t, s, "train.device=banana"), "train.device"),
    ("eval_device_banana", lambda t, s: ["evaluate", "--profile", "demo", *set_args(tiny_overrides(t, s, "eval.device=banana"))], "eval.device"),
    ("params_is_a_folder", lambda t, s: ["train", "--params", str(t / "empty")], "is not a file"),
    ("params_is_binary", lambda t, s: ["train", "--params", str(t / "params.bin")], "not a text file"),
    ("seed_past_64_bits", lambda t, s: _train(t, s, f"train.seed={2**64}"), "train.seed"),
    ("empty_out_dir", lambda t, s: _train(t, s, "train.out_dir="), "train.out_dir"),
    pytest.param("generate_on_cuda_without_gpu",
                 lambda t, s: ["generate", "--checkpoint", str(t / "c.pt"), "--prompt", "x", "--device", "cuda", "--out", str(t / "g.png")],
                 "no CUDA device", marks=NO_GPU),
    ("generate_out_is_a_folder", lambda t, s: ["generate", "--checkpoint", str(t / "c.pt"), "--prompt", "x", "--out", str(t / "empty")], "is a folder"),
    ("url_list_is_dev_zero", lambda t, s: _download(t, "data.url_list=/dev/zero"), "character device"),
    ("url_list_not_utf8", lambda t, s: _download(t, f"data.url_list={t / 'latin1.tsv'}"), "is not UTF-8"),
]


@pytest.mark.parametrize("name, argv, words", ROWS, ids=[r.values[0] if hasattr(r, "values") else r[0] for r in ROWS])
def test_a_refused_command_is_one_line_and_writes_nothing(name, argv, words, tmp_path, shards, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # params.yaml of this checkout
    (tmp_path / "empty").mkdir()
    (tmp_path / "params.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.tsv").write_bytes("http://127.0.0.1:9/a.jpg\tcaf\u00e9\n".encode("latin-1"))
    before = _tree(tmp_path)
    assert main(argv(tmp_path, shards)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], err
    assert _tree(tmp_path) == before, "a refused command leaves the file system as it found it"


def test_the_fix_a_refused_download_suggests_then_works(tmp_path, monkeypatch):
    """A list refused for its encoding left no download_params.yaml behind: after re-encoding it, the
    same shards folder is accepted (it was refused as 'written with a different list' before)."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    listing = tmp_path / "list.tsv"
    listing.write_bytes("http://127.0.0.1:9/a.jpg\tcaf\u00e9\n".encode("latin-1"))
    overrides = [f"data.url_list={listing}", f"data.shards_dir={tmp_path / 'data/shards'}"]
    assert main(["download", "--profile", "cc12m", *set_args(overrides)]) == 2
    listing.write_text("http://127.0.0.1:9/a.jpg\tcaf\u00e9\n", encoding="utf-8")
    check_fingerprint(load_config("params.yaml", overrides, profile="cc12m").data)


def test_url_list_with_a_byte_order_mark_keeps_its_first_row(tmp_path):
    import pandas as pd

    from galip.data.download import prepare_url_list

    listing = tmp_path / "excel.tsv"
    listing.write_text("\ufeffhttp://127.0.0.1:9/a.jpg\tfirst\nhttp://127.0.0.1:9/b.jpg\tsecond\n", encoding="utf-8")
    stats = prepare_url_list(load_config("params.yaml", [f"data.url_list={listing}"], profile="cc12m").data, tmp_path / "parts")
    rows = pd.read_parquet(next((tmp_path / "parts").glob("*.parquet")))
    assert stats.rows == 2 and stats.malformed == 0
    assert rows["url"].tolist() == ["http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/b.jpg"]


def test_a_refused_resume_keeps_the_config_its_checkpoints_were_trained_with(tmp_path, shards, capsys):
    assert run(tiny_config(tmp_path, shards, "train.max_steps=2"))["step"] == 2
    saved = (tmp_path / "run/config.yaml").read_bytes()
    assert main([*_train(tmp_path, shards, "train.max_steps=4", "train.seed=101"), "--resume"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "train.seed=100 -> 101" in line
    assert (tmp_path / "run/config.yaml").read_bytes() == saved
    assert yaml.safe_load(saved)["train"]["seed"] == 100


def _flip_member_name(path: Path) -> None:
    """Corrupt one byte inside a file name in the zip's central directory (an invalid UTF-8 byte)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        name = zf.infolist()[0].filename.encode()
    at = data.rindex(name)  # the central directory entry comes after the local header
    data[at + len(name) - 1] = 0xFF
    path.write_bytes(bytes(data))


def test_unreadable_checkpoints_resume_falls_back_and_all_unreadable_stops(tmp_path, shards, capsys, caplog):
    run(tiny_config(tmp_path, shards, "train.max_steps=4"))
    ckpt_dir = tmp_path / "run/checkpoints"
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    _flip_member_name(ckpt_dir / "ckpt_00000004.pt")
    # generate: the previous good checkpoint, said in a warning naming the unreadable file
    assert main(["generate", "--checkpoint", str(ckpt_dir / "ckpt_00000004.pt"), "--prompt", "x", "--n", "1", "--out", str(tmp_path / "g.png")]) == 0
    assert any("ckpt_00000004.pt is truncated or not a checkpoint" in r.getMessage() and "using the previous good one" in r.getMessage()
               for r in caplog.records)
    # a resume falls back to the previous one, as for a truncated file
    assert main([*_train(tmp_path, shards, "train.max_steps=6"), "--resume"]) == 0
    assert (ckpt_dir / "ckpt_00000004.pt.corrupt").exists()
    # every checkpoint unreadable: the resume stops in one line and changes nothing (it used to train from 0)
    for path in list_checkpoints(ckpt_dir):
        _flip_member_name(path)
    capsys.readouterr()
    before = _tree(tmp_path / "run")
    assert main([*_train(tmp_path, shards, "train.max_steps=8"), "--resume"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "none of the 3 checkpoint(s)" in line and "is readable" in line
    assert _tree(tmp_path / "run") == before


def test_a_secret_in_kube_env_is_refused_without_echoing_it(capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["config", "--profile", "demo", "-S", "kube.env={HF_TOKEN: hf_Zq9PwSecretValue, NCCL_SOCKET_IFNAME: eth0}"]) == 2
    out, err = capsys.readouterr()
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "kube.env" in line and "HF_TOKEN" in line and "Secret" in line
    assert "Zq9Pw" not in out + err
    assert main(["config", "--profile", "demo", "-S", "kube.env={NCCL_SOCKET_IFNAME: eth0}"]) == 0

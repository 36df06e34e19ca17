"""The procedural demo set: exact caption parsing, held-out splits, deterministic files, drawable scenes."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from galip.data import demo_data as dd
from galip.cli import main as cli_main
from galip.data.demo_data import (
    SceneAttributes,
    Wording,
    caption_for,
    caption_with,
    demo_prompts,
    held_in_prompts,
    held_out_prompts,
    make_demo_dataset,
    parse_caption,
    render_scene,
)

ALL_ATTRIBUTES = [
    SceneAttributes(shape=s, colour=c, position=p, size=z, count=n)
    for s, c, p, z, n in itertools.product(dd.SHAPES, dd.COLOURS, dd.POSITIONS, dd.SIZES, dd.COUNTS)
]


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_parse_caption_inverts_every_wording():
    rng = np.random.default_rng(0)
    seen: set[str] = set()
    for attrs in ALL_ATTRIBUTES:
        for _ in range(25):
            caption = caption_for(attrs, rng)
            seen.add(caption)
            assert parse_caption(caption) == attrs, caption
    # every phrase of every table was produced (and so parsed) at least once
    text = "\n".join(seen)
    for table in (dd._SIZE_WORDS, dd._POSITION_WORDS):
        for phrase in itertools.chain.from_iterable(table.values()):
            assert phrase in text, phrase
    def form(caption: str) -> str:
        for prefix in ("there ", "a picture of "):
            if caption.startswith(prefix):
                return prefix
        return "position first" if ", " in caption else "plain"

    assert {form(c) for c in seen} == {"there ", "a picture of ", "position first", "plain"}
    assert len(dd._TEMPLATES) == 4


def test_parse_caption_rejects_text_without_attributes():
    with pytest.raises(ValueError, match="no shape or colour"):
        parse_caption("a photo of a dog")
    with pytest.raises(ValueError, match="no position"):
        parse_caption("a small red circle")


def test_held_out_pairs_never_appear_in_training(tmp_path):
    info = make_demo_dataset(tmp_path, n_images=300, image_size=32, seed=3)
    rows = pd.read_parquet(info["url_list"])
    train_pairs = set(zip(rows["colour"], rows["shape"]))
    held = set(dd.HELD_OUT_PAIRS)
    assert not train_pairs & held
    # every colour and every shape is still seen in training: held-out prompts test recombination
    assert {c for c, _ in train_pairs} == set(dd.COLOURS) and {s for _, s in train_pairs} == set(dd.SHAPES)
    prompts = held_out_prompts(seed=1, n=50)
    assert len(prompts) == 50 and all((a.colour, a.shape) in held for _, a in prompts)
    assert all(parse_caption(p) == a for p, a in prompts)
    assert held_out_prompts(seed=1, n=50) == prompts and held_out_prompts(seed=2, n=50) != prompts
    # the stored captions parse back to the stored attributes
    for row in rows.itertuples():
        assert parse_caption(row.caption) == SceneAttributes(row.shape, row.colour, row.position, row.size, row.count)


def test_evaluation_splits_are_disjoint_and_held_out_pairs_stay_out_of_training(tmp_path):
    rows = pd.read_parquet(make_demo_dataset(tmp_path, n_images=300, image_size=32, seed=0)["url_list"])
    train_pairs = set(zip(rows["colour"], rows["shape"]))
    held = set(dd.HELD_OUT_PAIRS)
    held_in = {(a.colour, a.shape) for _, a in held_in_prompts(seed=4, n=200)}
    held_out = {(a.colour, a.shape) for _, a in held_out_prompts(seed=4, n=200)}
    assert held_in and held_out and not held_in & held_out
    assert held_in <= train_pairs and held_out == held and not held_out & train_pairs
    prompts = demo_prompts(seed=4, n=9)
    assert len(prompts) == 9
    splits = [(a.colour, a.shape) in held for _, a in prompts]
    assert splits == [False, True] * 4 + [False]  # alternating: any prefix covers both splits
    assert all(parse_caption(c) == a for c, a in prompts)


def test_captions_in_one_wording_differ_only_in_the_changed_attribute():
    a = SceneAttributes("square", "red", "left", "small", 1)
    w = Wording(template=2, count=1, size=2, position=2)
    assert caption_with(a, w) == "there is one tiny red square on the left side"
    b = SceneAttributes("square", "red", "left", "small", 2)
    assert caption_with(b, w) == "there is a pair of tiny red squares on the left side"
    # caption_for draws a wording from rng: the same captions as before the wording was made explicit
    assert caption_for(a, np.random.default_rng(0)) == caption_with(a, dd.random_wording(a, np.random.default_rng(0)))


def test_generation_is_byte_identical_for_a_seed(tmp_path):
    make_demo_dataset(tmp_path / "a", n_images=20, image_size=32, seed=7, broken=True)
    make_demo_dataset(tmp_path / "b", n_images=20, image_size=32, seed=7, broken=True)
    make_demo_dataset(tmp_path / "c", n_images=20, image_size=32, seed=8, broken=True)
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b and a != c  # data.dvc relies on this: a regenerated source has the recorded hash


def test_broken_entries_are_one_of_each_kind(tmp_path):
    info = make_demo_dataset(tmp_path, n_images=10, image_size=32, seed=0, broken=True)
    rows = pd.read_parquet(info["url_list"])
    assert info["broken"] == 5 and len(rows) == 15
    broken = rows[rows["broken"] != ""]
    assert sorted(broken["broken"]) == sorted(dd.BROKEN_KINDS)
    assert (tmp_path / "images/broken_empty.jpg").stat().st_size == 0
    assert not (tmp_path / "images/does_not_exist.jpg").exists()
    assert (tmp_path / "images/broken_html.jpg").read_bytes().startswith(b"<html>")


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(dd.RGB, key=lambda name: float(np.sum((np.array(dd.RGB[name]) - rgb) ** 2)))


@pytest.mark.parametrize("attrs", ALL_ATTRIBUTES[::7], ids=lambda a: f"{a.count}-{a.size}-{a.colour}-{a.shape}-{a.position}")
def test_rendered_scene_shows_its_attributes_at_64px(attrs):
    img = np.asarray(render_scene(attrs, 64, np.random.default_rng(0)).convert("RGB")).astype(np.float32)
    foreground = np.abs(img - np.array(dd.BACKGROUND)).sum(-1) > 90
    _, n = ndimage.label(foreground)
    assert n == attrs.count
    assert _nearest_colour(np.median(img[foreground], axis=0)) == attrs.colour
    ys, xs = np.nonzero(foreground)
    cx, cy = xs.mean() / 64, ys.mean() / 64
    expect = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6,
              "center": 0.4 < cx < 0.6 and 0.4 < cy < 0.6}
    assert expect[attrs.position], (cx, cy)
    area = foreground.sum() / attrs.count
    assert (area > 150) if attrs.size == "large" else (40 < area < 150), area  # recognisable, and sizes apart


def test_demo_data_cli_generates_once(tmp_path):
    url_list = tmp_path / "source/urls.parquet"
    args = ["--profile", "demo", "-S", f"data.url_list={url_list}", "-S", "data.demo_images=12", "-S", "data.demo_broken=false"]
    assert cli_main(["demo-data", *args]) == 0
    first = _digest(tmp_path / "source")
    assert len(pd.read_parquet(url_list)) == 12 and len(first) == 13
    mtime = url_list.stat().st_mtime_ns
    assert cli_main(["demo-data", *args]) == 0 and url_list.stat().st_mtime_ns == mtime  # present: left alone

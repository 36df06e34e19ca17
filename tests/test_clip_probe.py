"""The text-signal measurement of the clip stage (galip.train.clip_probe) and the stage's report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from galip.data import demo_data as dd
from galip.model.clip import load_clip, register_project_model_configs
from galip.train.clip_probe import KINDS, SPLITS, attribute_separation, chance, flat_metrics, probe_captions, probe_scenes
from galip.config import load_config


@pytest.fixture(scope="module")
def random_clip():
    torch.manual_seed(0)
    return load_clip("galip-tiny", "", pixel_norm="standard")


@pytest.fixture(scope="module")
def separation(random_clip):
    return attribute_separation(random_clip, n=12, seed=3)


def test_separation_reports_every_split_kind_and_attribute_in_range(separation):
    assert set(separation) == {*SPLITS, "chance", "n"} and separation["n"] == 12
    assert separation["chance"] == pytest.approx({"shape": 100 / 3, "colour": 25, "position": 20, "size": 50, "count": 50})
    for split in SPLITS:
        for kind in KINDS:
            acc = separation[split][kind]
            assert set(acc) == {"shape", "colour", "position", "size", "count", "min"}
            assert all(0 <= v <= 100 for v in acc.values())
            assert acc["min"] == min(v for k, v in acc.items() if k != "min")
    flat = flat_metrics(separation)
    assert len(flat) == 2 * 2 * 6 and flat["sep_held_out_image_text_position"] == separation["held_out"]["image_text"]["position"]


def test_separation_is_deterministic(random_clip, separation):
    assert attribute_separation(random_clip, n=12, seed=3) == separation


def test_a_clip_blind_to_one_attribute_scores_chance_on_it():
    """Text encodings that ignore position (every position word maps to one token) cannot rank position."""

    class PositionBlind(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.clip, name)

        def tokenize(self, texts):
            words = [p for ps in dd._POSITION_WORDS.values() for p in ps]
            for w in sorted(words, key=len, reverse=True):
                texts = [t.replace(w, "somewhere") for t in texts]
            return self.clip.tokenize(texts)

    torch.manual_seed(0)
    blind = PositionBlind(load_clip("galip-tiny", "", pixel_norm="standard"))
    acc = attribute_separation(blind, n=20, seed=0)
    for split in SPLITS:
        # the candidates are the same text: no better than a draw among equals (ties are misses)
        assert acc[split]["image_text"]["position"] <= 50 and acc[split]["text_text"]["position"] <= 50
        assert acc[split]["image_text"]["colour"] > 0  # the other attributes still get scored


def test_held_out_probe_captions_never_occur_in_the_pretraining_data(tmp_path):
    info = dd.make_demo_dataset(tmp_path, n_images=400, image_size=32, seed=0)
    training = set(pd.read_parquet(info["url_list"])["caption"])
    held = set(dd.HELD_OUT_PAIRS)
    for scene in probe_scenes(held_out=True, n=100, seed=0):
        assert (scene.attrs.colour, scene.attrs.shape) in held
        for caption in probe_captions(scene):
            attrs = dd.parse_caption(caption)
            if (attrs.colour, attrs.shape) in held:
                assert caption not in training
    # held-in probe scenes use only pairs the training data shows
    seen = {(a.colour, a.shape) for a in map(dd.parse_caption, training)}
    assert {(s.attrs.colour, s.attrs.shape) for s in probe_scenes(held_out=False, n=100, seed=0)} <= seen


def test_candidates_differ_from_the_true_caption_in_exactly_one_attribute():
    for scene in probe_scenes(held_out=False, n=20, seed=5):
        captions = probe_captions(scene)
        assert dd.parse_caption(captions[0]) == scene.attrs  # the query: same scene, other wording
        for caption in captions[1:]:
            got = dd.parse_caption(caption)
            changed = [a for a in ("shape", "colour", "position", "size", "count") if getattr(got, a) != getattr(scene.attrs, a)]
            assert len(changed) <= 1


def test_clip_stage_report_has_separation_and_reaches_mlflow(tmp_path, caplog):
    import mlflow
    import open_clip

    from galip.train.clip_pretrain import measure_separation, report

    register_project_model_configs()
    torch.manual_seed(0)
    ckpt = tmp_path / "clip.pt"
    torch.save(open_clip.create_model("galip-tiny", pretrained=None).state_dict(), ckpt)
    cfg = load_config(
        "params.yaml",
        [f"clip_pretrain.report_path={tmp_path / 'report.json'}", "clip_pretrain.separation_samples=8"],
        profile="demo",
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    result = {"checkpoint": str(ckpt), "wall_s": 1.0, "separation": measure_separation(cfg, ckpt)}
    with caplog.at_level("WARNING", logger="galip.clip_pretrain"):
        report(cfg, result)
    saved = json.loads((tmp_path / "report.json").read_text())
    # random weights separate nothing: the report and the warning name what the generator could not follow
    weak = saved["weak_attributes"]
    assert set(weak) == {"shape", "colour", "position", "size", "count"} and weak["position"] < 75
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "galip.clip_pretrain"]
    assert f"position {weak['position']:.0f} % (chance 20 %)" in warning and "clip_pretrain.seed" in warning
    assert saved["separation"]["held_out"]["image_text"].keys() >= {"position", "min"}
    # the clip stage's record in the pipeline's run: the report, and two numbers for the run page
    from galip.ops.pipeline_run import RECORDS

    RECORDS["clip"](cfg, client, run_id)
    run = client.get_run(run_id).data
    assert run.metrics == {}, "summaries are tags: the Metrics tab starts with the training curves"
    assert {k: float(v) for k, v in run.tags.items() if k.startswith("clip.") and k.endswith("separation")} == {
        "clip.held_in_min_separation": saved["separation"]["held_in"]["image_text"]["min"],
        "clip.held_out_min_separation": saved["separation"]["held_out"]["image_text"]["min"]}
    assert [a.path for a in client.list_artifacts(run_id, "clip")] == ["clip/report.json"]


def test_weak_attributes_are_the_held_in_image_text_scores_below_the_floor():
    from galip.train.clip_probe import weak_attributes

    sep = {"held_in": {"image_text": {"shape": 98.0, "colour": 100.0, "position": 35.0, "size": 74.9, "count": 75.0, "min": 35.0}}}
    assert weak_attributes(sep) == {"position": 35.0, "size": 74.9}
    assert weak_attributes(sep, floor=30) == {}


def test_chance_levels_match_the_value_counts():
    assert chance()["colour"] == 100 / len(dd.COLOURS)

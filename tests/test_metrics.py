"""The metric machinery on real modules and data: Fréchet statistics, caches, weights lookup, shards, R-precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from galip.eval.metrics import known_metrics
from galip.eval.metrics.clip_score import clip_score
from galip.eval.metrics.fid import INCEPTION_FILE, INCEPTION_URL, InceptionWeightsError, find_inception_weights, inception_features
from galip.eval.metrics.frechet import (
    FeatureAccumulator,
    FrechetStats,
    RefStatsCache,
    cache_key,
    frechet_distance,
    module_fingerprint,
)
from galip.eval.metrics.r_precision import DistractorSampler, top1_hit
from galip.eval.metrics.reference import ReferenceSetError, list_shards, reference_captions, reference_image_batches

from helpers import write_shards


class Flat(nn.Module):
    """Identity features: the Fréchet distance of the data itself (closed form known for Gaussians)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double()


class ConvFeatures(nn.Module):
    """A small fixed random conv net on uint8 images, like an Inception stand-in."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.num_features = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 127.5 - 1)


def _stats(feature: nn.Module, data: torch.Tensor, chunk: int = 1000) -> FrechetStats:
    acc = FeatureAccumulator(feature, torch.device("cpu"))
    for i in range(0, len(data), chunk):
        acc.update(data[i : i + chunk])
    return acc.stats()


def test_metric_names_are_the_public_ones():
    assert known_metrics() == ["clip_score", "fd_clip", "fid", "prompt_fidelity", "r_precision"]


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    g = torch.Generator().manual_seed(0)
    d, n = 8, 20000
    shift = torch.full((d,), 0.5)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64)
    c = 2 * torch.randn(n, d, generator=g, dtype=torch.float64) + shift
    sa, sb, sc = (_stats(Flat(d), x) for x in (a, b, c))
    assert sa.n == n and sa.mean.shape == (d,) and sa.cov.shape == (d, d)
    # N(0, I) vs N(m, 4I): |m|^2 + d * (2 - 1)^2
    expected = float(shift.square().sum()) + d
    assert frechet_distance(sa, sc) == pytest.approx(expected, rel=0.05)
    assert frechet_distance(sa, sb) < 0.01 * expected  # same distribution: only sampling noise
    assert frechet_distance(sa, sa) == pytest.approx(0.0, abs=1e-6)


def test_frechet_stats_reproduce_torchmetrics_fid_on_a_conv_extractor():
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (64, 3, 16, 16), generator=g, dtype=torch.uint8)
    fake = (real.float() * 0.6 + 40).round().clamp(0, 255).to(torch.uint8)  # darker, lower contrast
    feature = ConvFeatures()
    tm = FrechetInceptionDistance(feature=feature)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    ours = frechet_distance(_stats(feature, real, 16), _stats(feature, fake, 16))
    assert ours == pytest.approx(float(tm.compute()), rel=1e-4)
    assert ours > frechet_distance(_stats(feature, real[:32], 16), _stats(feature, real[32:], 16))


def test_frechet_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        _stats(Flat(4), torch.zeros(1, 4, dtype=torch.float64))


def test_reference_cache_round_trip_and_key(tmp_path):
    stats = _stats(Flat(3), torch.randn(50, 3, dtype=torch.float64))
    cache = RefStatsCache(tmp_path)
    parts = {"manifest": [["a.tar", 10]], "images": 50, "resolution": 64, "extractor": {"x": 1}, "weights": "w"}
    key = cache_key(parts)
    assert cache.load("fd_clip", key) is None
    cache.save("fd_clip", key, stats, parts)
    back = cache.load("fd_clip", key)
    assert back.n == 50 and torch.equal(back.mean, stats.mean) and torch.equal(back.cov, stats.cov)
    for change in ({"manifest": [["a.tar", 11]]}, {"resolution": 128}, {"weights": "v"}, {"images": 49}):
        assert cache_key({**parts, **change}) != key
    assert cache_key(dict(reversed(list(parts.items())))) == key


def test_module_fingerprint_tracks_weights_not_names():
    assert module_fingerprint(ConvFeatures(0)) == module_fingerprint(ConvFeatures(0))
    assert module_fingerprint(ConvFeatures(0)) != module_fingerprint(ConvFeatures(1))


def test_missing_inception_weights_is_a_clear_error_and_never_downloads(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(InceptionWeightsError) as err:
        find_inception_weights("")
    msg = str(err.value)
    assert INCEPTION_FILE in msg and INCEPTION_URL in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE) in msg
    assert "eval.inception_weights" in msg
    with pytest.raises(InceptionWeightsError, match="eval.inception_weights='/nope/w.pth'"):
        find_inception_weights("/nope/w.pth")
    assert no_network == []


@pytest.mark.slow
def test_inception_weights_are_found_in_torch_hub_cache(torch_home_with_inception, no_network):
    assert find_inception_weights("") == torch_home_with_inception
    net = inception_features(find_inception_weights(""))
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    stats = _stats(net, images)
    assert stats.n == 3 and stats.mean.shape == (2048,)
    assert no_network == []


# --- reference set ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("ref"), n_samples=20, per_shard=6, size=32)


def test_reference_images_split_across_ranks_cover_the_set_once(shards):
    files = list_shards(str(shards), "data.shards_dir")
    assert [p.name for p in files] == sorted(p.name for p in files) and len(files) == 4
    whole = torch.cat(list(reference_image_batches(files, 15, 24, batch_size=4)))
    assert whole.shape == (15, 3, 24, 24) and whole.dtype == torch.uint8
    r0 = torch.cat(list(reference_image_batches(files, 15, 24, 4, rank=0, world_size=2)))
    r1 = torch.cat(list(reference_image_batches(files, 15, 24, 4, rank=1, world_size=2)))
    assert len(r0) == 8 and len(r1) == 7
    assert torch.equal(whole[0::2], r0) and torch.equal(whole[1::2], r1)


def test_reference_captions_are_the_first_n_in_order(shards):
    files = list_shards(str(shards), "eval.ref_shards")
    caps = reference_captions(files, 20)
    assert reference_captions(files, 7) == caps[:7]
    assert all(c.startswith("a ") for c in caps)


def test_reference_set_errors_name_the_setting(tmp_path, shards):
    with pytest.raises(ReferenceSetError, match="eval.ref_shards"):
        list_shards(str(tmp_path), "eval.ref_shards")
    with pytest.raises(ReferenceSetError, match="local shards"):
        list_shards("s3://bucket/shards/{000..003}.tar", "data.shards")
    files = list_shards(str(shards), "data.shards_dir")
    with pytest.raises(ReferenceSetError, match="fewer than the 21"):
        list(reference_image_batches(files, 21, 16, 8))
    with pytest.raises(ReferenceSetError, match="fewer than the 25 prompts"):
        reference_captions(files, 25)
    brace = str(shards / "shard-{00000..00001}.tar")
    assert [p.name for p in list_shards(brace, "eval.ref_shards")] == ["shard-00000.tar", "shard-00001.tar"]


# --- CLIP score and R-precision ---------------------------------------------------------------


def test_clip_score_is_100_times_clamped_cosine():
    assert clip_score(torch.tensor([-0.5, 0.0, 0.3, 1.0])).tolist() == pytest.approx([0.0, 0.0, 30.0, 100.0])


def test_distractors_exclude_the_true_meaning_and_are_reproducible():
    meanings = [i // 3 for i in range(60)]  # 20 meanings, 3 paraphrases each
    sampler = DistractorSampler(meanings, wanted=99, seed=0)
    assert sampler.k == 57  # only 60 - 3 captions mean something else
    got = sampler(true=4, sample_index=11)
    assert len(set(got.tolist())) == 57 and all(meanings[i] != meanings[4] for i in got)
    assert np.array_equal(got, sampler(4, 11)) and not np.array_equal(got, sampler(4, 12))
    small = DistractorSampler(meanings, wanted=9, seed=0)(0, 0)
    assert len(small) == 9
    with pytest.raises(ValueError, match="two different meanings"):
        DistractorSampler(["same"] * 5, wanted=99, seed=0)


def test_top1_hit_is_perfect_for_matching_embeddings_and_chance_for_random():
    g = torch.Generator().manual_seed(0)
    pool = torch.nn.functional.normalize(torch.randn(200, 32, generator=g), dim=-1)
    sampler = DistractorSampler(list(range(200)), wanted=9, seed=0)
    matched, rand = [], []
    for i in range(200):
        others = torch.from_numpy(sampler(i, i))
        matched.append(top1_hit(pool[i] + 0.05 * torch.randn(32, generator=g), pool, i, others))
        rand.append(top1_hit(torch.randn(32, generator=g), pool, i, others))
    assert all(matched)
    assert 0.02 < sum(rand) / 200 < 0.25  # chance is 1 in 10
    assert not top1_hit(pool[0], torch.stack([pool[0], pool[0]]), 0, torch.tensor([1]))  # a tie is a miss


# --- prompt fidelity (demo scenes) --------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder():
    from galip.eval.metrics.prompt_fidelity import SceneDecoder

    return SceneDecoder.calibrate(64)


def test_decoder_reads_rendered_scenes(decoder):
    accuracy = decoder.accuracy_on_renders(64, n=200, seed=7)  # scenes it was not calibrated on
    assert all(acc >= 0.95 for acc in accuracy.values()), accuracy


def test_decoder_is_near_chance_on_noise(decoder):
    from galip.data import demo_data
    from galip.eval.metrics.prompt_fidelity import ATTRIBUTES, _random_attrs, attribute_matches

    rng = np.random.default_rng(3)
    hits = {a: 0 for a in ATTRIBUTES}
    n = 100
    for _ in range(n):
        target = _random_attrs(demo_data, rng)
        got = attribute_matches(decoder.decode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), target)
        for a in ATTRIBUTES:
            hits[a] += bool(got[a])
    values = {"shape": demo_data.SHAPES, "colour": demo_data.COLOURS, "position": demo_data.POSITIONS,
              "size": demo_data.SIZES, "count": demo_data.COUNTS}
    for a in ATTRIBUTES:
        assert hits[a] / n <= 1 / len(list(values[a])) + 0.15, (a, hits[a])


def test_unstated_attributes_are_not_scored():
    from galip.eval.metrics.prompt_fidelity import attribute_matches

    class Wanted:
        shape, colour, position, size, count = "circle", "red", None, None, 1

    decoded = {"shape": "circle", "colour": "blue", "position": "left", "size": "small", "count": 1}
    assert attribute_matches(decoded, Wanted()) == {
        "shape": True, "colour": False, "position": None, "size": None, "count": True
    }


def test_prompt_fidelity_splits_score_rendered_scenes_near_perfect_and_noise_low():
    """The split bookkeeping on a perfect 'generator' (the renderer itself) and on noise."""
    from galip.data import demo_data
    from galip.eval.metrics.prompt_fidelity import ATTRIBUTES, checked_decoder, result_keys, score_images, scored_keys, summary_score

    decoder, _ = checked_decoder(64)
    prompts = demo_data.demo_prompts(seed=2, n=60)
    rng = np.random.default_rng(0)
    rendered = np.stack([np.asarray(demo_data.render_scene(a, 64, rng).convert("RGB")) for _, a in prompts])
    for images, low, high in ((rendered, 90, 100), (rng.integers(0, 256, rendered.shape, dtype=np.uint8), 0, 40)):
        scores = score_images(decoder, images, [a for _, a in prompts])
        assert set(scores) == set(scored_keys())
        assert len(scores["prompt_fidelity_held_in_all_attrs"]) == len(scores["prompt_fidelity_held_out_all_attrs"]) == 30
        means = {k: float(np.mean(v)) for k, v in scores.items()}
        assert low <= summary_score(means) <= high, means
        # the headline is half the held-in attribute mean plus half the held-out all-attributes share
        held_in_attr_mean = sum(means[f"prompt_fidelity_held_in_{a}"] for a in ATTRIBUTES) / len(ATTRIBUTES)
        assert summary_score(means) == pytest.approx(0.5 * held_in_attr_mean + 0.5 * means["prompt_fidelity_held_out_all_attrs"])
    # every reported name says what it measures: split, then all_attrs, attr_mean or the attribute
    assert result_keys()[:3] == ["prompt_fidelity", "prompt_fidelity_held_in_attr_mean", "prompt_fidelity_held_out_attr_mean"]
    assert all(k.split("_", 4)[-1] in ("all_attrs", "attr_mean", *ATTRIBUTES) for k in result_keys()[1:]), result_keys()
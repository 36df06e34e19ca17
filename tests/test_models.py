"""Shapes, exact reference parameter counts and CLIP-wrapper correctness (tiny and ViT-B-32 configs)."""

import json

import pytest
import torch

from galip.cli import main
from galip.model.clip import load_clip
from galip.config import load_config
from galip.model.models import build_nets, count_params, g_block_plan


@pytest.fixture(scope="module")
def demo_cfg():
    return load_config("params.yaml", profile="demo")


@pytest.fixture(scope="module")
def tiny(demo_cfg):
    m = demo_cfg.model
    clip = load_clip(m.clip_model, "", m.feature_blocks, m.prompt_blocks, m.pixel_norm)
    torch.manual_seed(0)
    return clip, build_nets(m, clip)


@pytest.fixture(scope="module")
def vitb32():
    cfg = load_config("params.yaml", ["model.clip_pretrained="], profile="cc12m")
    clip = load_clip(cfg.model.clip_model, "", cfg.model.feature_blocks, cfg.model.prompt_blocks)
    return cfg, clip, build_nets(cfg.model, clip)


def test_vitb32_parameter_counts_match_the_reference(vitb32):
    _, clip, (g, d, c) = vitb32
    assert (count_params(g), count_params(d), count_params(c)) == (51_830_211, 28_706_821, 2_099_200)
    assert count_params(clip, trainable_only=False) == 151_277_313
    assert count_params(clip) == 0  # frozen
    assert count_params(g.fc_code) == 316_736
    mapper = [g.mapper_blocks, g.conv_fuse, g.fc_prompt, g.conv_mapped]
    assert sum(count_params(m) for m in mapper) == 15_999_616
    assert count_params(g.g_blocks) == 35_512_128 and count_params(g.to_rgb) == 1_731
    # NetG must not own the frozen CLIP (its state_dict would carry 150 M frozen weights)
    assert not any(k.startswith("clip") for k in g.state_dict())


def test_vitb32_shapes(vitb32):
    cfg, clip, (g, d, c) = vitb32
    assert g_block_plan(7, 224, 64) == [(512, 512, 8), (512, 512, 16), (512, 512, 32), (512, 256, 64), (256, 128, 128), (128, 64, 224)]
    with torch.no_grad():
        sent, words = clip.encode_text(clip.tokenize(["a red bird"]))
        img = g(torch.randn(1, 100), sent)
        feats, emb = clip.image_features(img)
        logits = c(d(feats), sent)
    assert sent.shape == (1, 512) and words.shape == (1, 77, 512)
    assert img.shape == (1, 3, 224, 224)
    assert feats.shape == (1, 3, 768, 7, 7) and emb.shape == (1, 512)
    assert logits.shape == (1, 1, 1, 1)


def test_tiny_shapes_derive_from_the_clip_config(tiny, demo_cfg):
    clip, (g, d, c) = tiny
    dims = clip.dims
    assert (dims.width, dims.grid, dims.image_size, dims.depth, dims.embed_dim) == (128, 8, 64, 4, 128)
    with torch.no_grad():
        sent, _ = clip.encode_text(clip.tokenize(["a red circle", "two blue squares"]))
        img = g(torch.randn(2, demo_cfg.model.nz), sent)
        feats, emb = clip.image_features(img)
        logits = c(d(feats), sent)
    assert img.shape == (2, 3, 64, 64)
    assert feats.shape == (2, 3, 128, 8, 8) and emb.shape == (2, 128)
    assert logits.shape[0] == 2 and logits.shape[1] == 1


def test_text_features_are_causal_and_pooled_at_eot(tiny):
    # open_clip applies the causal attn_mask at call time: a naive port that drops it leaks later
    # tokens into earlier ones. Changing the last word must leave earlier token features unchanged.
    clip, _ = tiny
    tok = clip.tokenize(["a red circle on the left", "a red circle on the right"])
    with torch.no_grad():
        sent, words = clip.encode_text(tok)
    first_diff = int((tok[0] != tok[1]).nonzero()[0])
    assert torch.equal(words[0, :first_diff], words[1, :first_diff])
    assert not torch.allclose(sent[0], sent[1])
    eot = tok.argmax(dim=-1)
    proj = clip.model.text_projection
    assert torch.allclose(sent, words[torch.arange(2), eot] @ proj, atol=1e-5)


def test_image_features_match_open_clip(tiny):
    clip, _ = tiny
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        feats, emb = clip.image_features(x)
        ref = clip.model.encode_image(clip.to_clip_input(x))
    assert torch.allclose(emb, ref, atol=1e-5)
    # features are the raw patch tokens after the chosen blocks, in NCHW, class token dropped
    v = clip.visual
    assert not v.transformer.batch_first  # FrozenCLIP runs the towers in OpenAI CLIP's [seq, batch, width] layout
    with torch.no_grad():
        tokens = v._embeds(clip.to_clip_input(x)).transpose(0, 1)
        for i, blk in enumerate(v.transformer.resblocks):
            tokens = blk(tokens)
            if i == clip.feature_blocks[-1]:
                break
    expect = tokens.transpose(0, 1)[:, 1:].transpose(1, 2).reshape(2, 128, 8, 8)
    assert torch.allclose(feats[:, -1], expect, atol=1e-5)


def test_reference_pixel_normalisation():
    clip = load_clip("galip-tiny", "", pixel_norm="reference")
    black = -torch.ones(1, 3, 64, 64)
    white = torch.ones(1, 3, 64, 64)
    # reference: [-1, 1] -> [0, 1] -> (x + 1) / 2 -> [0.5, 1] before mean/std
    assert torch.allclose(clip.to_clip_input(black)[0, :, 0, 0], ((0.5 - clip.mean) / clip.std).flatten())
    assert torch.allclose(clip.to_clip_input(white)[0, :, 0, 0], ((1.0 - clip.mean) / clip.std).flatten())
    standard = load_clip("galip-tiny", "", pixel_norm="standard")
    assert torch.allclose(standard.to_clip_input(black)[0, :, 0, 0], ((0.0 - clip.mean) / clip.std).flatten())


def test_mapper_without_prompts_is_the_plain_vit_and_prompts_matter(tiny):
    clip, _ = tiny
    bridge = torch.randn(2, 128, 8, 8)
    prompts = torch.randn(2, len(clip.prompt_blocks), 128)
    with torch.no_grad():
        with_prompts = clip.map_bridge(bridge, prompts)
        other = clip.map_bridge(bridge, prompts + 1)
        saved = clip.prompt_blocks
        clip.prompt_blocks = ()
        plain = clip.map_bridge(bridge, prompts[:, :0])
        clip.prompt_blocks = saved
        v = clip.visual
        x = torch.cat([v.class_embedding.view(1, 1, -1).expand(2, 1, -1), bridge.flatten(2).transpose(1, 2)], 1)
        x = v.transformer(v.ln_pre(x + v.positional_embedding))
    assert torch.allclose(plain, x[:, 1:].transpose(1, 2).reshape(2, 128, 8, 8), atol=1e-5)
    assert with_prompts.shape == bridge.shape and not torch.allclose(with_prompts, other)


def test_affine_starts_as_identity_and_d_gates_start_closed(tiny):
    clip, (g, d, c) = tiny
    aff = g.g_blocks[0].fuse1.affine0
    x = torch.randn(2, aff.fc_gamma.linear2.out_features, 4, 4)
    assert torch.equal(aff(x, torch.randn(2, aff.fc_gamma.linear1.in_features)), x)
    assert all(b.gamma.item() == 0 and b.beta.item() == 0 for b in d.blocks)


def test_bad_block_indices_are_rejected():
    with pytest.raises(ValueError, match="model.feature_blocks"):
        load_clip("galip-tiny", "", feature_blocks=(0, 9, 1))


def test_missing_local_weights_say_how_to_stage(tmp_path):
    from galip.model.clip import ClipWeightsError

    with pytest.raises(ClipWeightsError, match="no such file"):
        load_clip("galip-tiny", str(tmp_path / "missing.pt"))


def test_summary_cli_prints_one_json_object(capsys):
    assert main(["summary"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["netG"], out["netD"], out["netC"], out["clip_frozen"]) == (51_830_211, 28_706_821, 2_099_200, 151_277_313)
    assert main(["summary", "--clip", "galip-tiny", "--image-size", "64"]) == 0
    tiny = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tiny["clip_grid"] == 8 and tiny["netG"] < out["netG"]


def test_a_clip_without_pretrained_weights_says_so_in_one_line_of_ours(caplog):
    with caplog.at_level("INFO"):
        load_clip("galip-tiny", "")
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if m.startswith("No pretrained weights loaded")], "open_clip's warning is replaced"
    assert [r.getMessage() for r in caplog.records if r.name == "galip.clip"] == ["CLIP galip-tiny: random weights, as asked (no pretrained weights given)"]

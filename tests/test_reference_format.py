"""Reference GALIP checkpoints (tobran/GALIP format): the key map, export -> import round trips,
partial files, fine-tuning from an import, registration with its origin, and wrong files."""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import galip.model
from galip.train.checkpoint import latest_checkpoint, load_checkpoint, load_generator, training_clip
from galip.cli import main
from galip.config import load_config
from galip.eval.generate import generate_images
from galip.model.models import build_nets
from galip.train.reference_format import from_reference, to_reference
from galip.train.trainer import run

from helpers import assert_bitwise_equal, tiny_overrides, write_shards

# --- the reference module tree, written down from tobran/GALIP code/models/GALIP.py and OpenAI CLIP's
# clip/model.py. State-dict order is registration order, a module's own parameters before its children.


def linear(name, i, o, bias=True):
    return [(f"{name}.weight", (o, i))] + ([(f"{name}.bias", (o,))] if bias else [])


def conv(name, i, o, k, bias=True):
    return [(f"{name}.weight", (o, i, k, k))] + ([(f"{name}.bias", (o,))] if bias else [])


def layer_norm(name, w):
    return [(f"{name}.weight", (w,)), (f"{name}.bias", (w,))]


def affine(name, cond, ch):  # Affine: fc_gamma, fc_beta = Sequential(linear1: cond -> ch, relu1, linear2: ch -> ch)
    return [e for mlp in ("fc_gamma", "fc_beta") for e in linear(f"{name}.{mlp}.linear1", cond, ch) + linear(f"{name}.{mlp}.linear2", ch, ch)]


def dfblk(name, cond, ch):  # DFBLK: affine0, affine1
    return affine(f"{name}.affine0", cond, ch) + affine(f"{name}.affine1", cond, ch)


def m_block(name, i, mid, o, cond):  # M_Block: conv1, fuse1, conv2, fuse2, c_sc only if i != o
    body = conv(f"{name}.conv1", i, mid, 3) + dfblk(f"{name}.fuse1", cond, mid) + conv(f"{name}.conv2", mid, o, 3) + dfblk(f"{name}.fuse2", cond, o)
    return body + (conv(f"{name}.c_sc", i, o, 1) if i != o else [])


def g_block(name, cond, i, o):  # G_Block: c1, c2, fuse1, fuse2, c_sc only if i != o
    body = conv(f"{name}.c1", i, o, 3) + conv(f"{name}.c2", o, o, 3) + dfblk(f"{name}.fuse1", cond, i) + dfblk(f"{name}.fuse2", cond, o)
    return body + (conv(f"{name}.c_sc", i, o, 1) if i != o else [])


def resblock(name, w):  # ResidualAttentionBlock: attn (nn.MultiheadAttention), ln_1, mlp (c_fc, gelu, c_proj), ln_2
    attn = [(f"{name}.attn.in_proj_weight", (3 * w, w)), (f"{name}.attn.in_proj_bias", (3 * w,)), *linear(f"{name}.attn.out_proj", w, w)]
    return attn + layer_norm(f"{name}.ln_1", w) + linear(f"{name}.mlp.c_fc", w, 4 * w) + linear(f"{name}.mlp.c_proj", 4 * w, w) + layer_norm(f"{name}.ln_2", w)


def clip_mapper(name, s):  # CLIP_Mapper: class_embedding, positional_embedding (own), conv1, ln_pre, transformer
    head = [(f"{name}.class_embedding", (s.width,)), (f"{name}.positional_embedding", (s.grid**2 + 1, s.width))]
    head += conv(f"{name}.conv1", 3, s.width, s.patch, bias=False) + (layer_norm(f"{name}.ln_pre", s.width) if s.ln_pre else [])
    return head + [e for i in range(s.depth) for e in resblock(f"{name}.transformer.resblocks.{i}", s.width)]


def net_g_table(s):  # NetG: fc_code, mapping (CLIP_Adapter: FBlocks, conv_fuse, CLIP_ViT, conv, fc_prompt), GBlocks, to_rgb
    cond = s.nz + s.embed
    chans = [s.ngf * min(2**i, 8) for i in range(s.g_blocks + 1)][::-1]  # get_G_in_out_chs
    table = linear("fc_code", s.nz, s.code * s.grid**2)
    for i in range(s.mapper_blocks):
        table += m_block(f"mapping.FBlocks.{i}", s.code, s.mid, s.code, cond)
    table += conv("mapping.conv_fuse", s.code, s.width, 5) + clip_mapper("mapping.CLIP_ViT", s)
    table += conv("mapping.conv", s.width, chans[0], 5) + linear("mapping.fc_prompt", cond, s.width * s.n_prompts)
    for i in range(s.g_blocks):
        table += g_block(f"GBlocks.{i}", cond, chans[i], chans[i + 1])
    return table + conv("to_rgb.1", chans[-1], 3, 3)


def d_block(name, fin, fout, clip_feat):  # D_Block: gamma, [beta] (own), conv_r (0, 2: no bias), conv_s
    own = [(f"{name}.gamma", (1,))] + ([(f"{name}.beta", (1,))] if clip_feat else [])
    return own + conv(f"{name}.conv_r.0", fin, fout, 3, bias=False) + conv(f"{name}.conv_r.2", fout, fout, 3, bias=False) + conv(f"{name}.conv_s", fin, fout, 1)


def net_d_table(s):  # NetD: DBlocks (one per extra CLIP feature), main
    blocks = [e for i in range(s.n_feats - 1) for e in d_block(f"DBlocks.{i}", s.width, s.width, True)]
    return blocks + d_block("main", s.width, s.ndf * 8, False)


def net_c_table(s):  # NetC: joint_conv = conv 4x4 (no bias), LeakyReLU, conv 4x4 (no bias)
    return conv("joint_conv.0", s.ndf * 8 + s.embed, s.ndf * 2, 4, bias=False) + conv("joint_conv.2", s.ndf * 2, 1, 4, bias=False)


VITB32 = SimpleNamespace(
    nz=100, ngf=64, ndf=64, code=64, mid=32, mapper_blocks=4, g_blocks=6,
    width=768, patch=32, grid=7, depth=12, embed=512, n_prompts=8, n_feats=3, ln_pre=True,
)  # fmt: skip
# The demo profile shrunk by helpers.tiny_overrides; galip-tiny: width 128, patch 8 at 64 px, 4 blocks, embed 128,
# and no ln_pre (its vision_cfg.no_ln_pre: open_clip makes it an Identity, so the tree has no ln_pre entries).
TINY = SimpleNamespace(
    nz=100, ngf=8, ndf=8, code=8, mid=8, mapper_blocks=1, g_blocks=3,
    width=128, patch=8, grid=8, depth=4, embed=128, n_prompts=3, n_feats=3,
    ln_pre=not json.loads((Path(galip.model.__file__).parent / "model_configs/galip-tiny.json").read_text())["vision_cfg"].get("no_ln_pre", False),
)  # fmt: skip
TABLES = {"netG": net_g_table, "netD": net_d_table, "netC": net_c_table}


def layout(state):
    return [(k, tuple(v.shape)) for k, v in state.items()]


def images(net_g, clip, n=2):
    return generate_images(net_g, clip, ["a red square on the left"], n=n, seed=5)


# --- ViT-B-32-quickgelu, 224 px: in memory, random weights ---------------------------------------------
@pytest.fixture(scope="module")
def vitb32():
    cfg = load_config("params.yaml", ["model.clip_pretrained="], profile="cc12m")
    clip = training_clip(cfg)
    torch.manual_seed(0)
    return cfg, clip, build_nets(cfg.model, clip)


def test_vitb32_key_map_is_the_reference_tree_with_the_reference_counts(vitb32):
    _, _, nets = vitb32
    for (name, table), net in zip(TABLES.items(), nets):
        assert layout(to_reference(net)) == table(VITB32), name
    g_sizes = {k: torch.Size(s).numel() for k, s in net_g_table(VITB32)}
    assert sum(n for k, n in g_sizes.items() if "CLIP_ViT" not in k) == 51_830_211
    assert sum(n for k, n in g_sizes.items() if "CLIP_ViT" in k) == 87_454_464  # the frozen ViT inside G
    assert sum(torch.Size(s).numel() for _, s in net_d_table(VITB32)) == 28_706_821
    assert sum(torch.Size(s).numel() for _, s in net_c_table(VITB32)) == 2_099_200


def test_vitb32_round_trip_gives_bit_identical_weights_and_images(vitb32):
    _, clip, nets = vitb32
    files = {name: OrderedDict((k, v.clone()) for k, v in to_reference(net).items()) for name, net in zip(TABLES, nets)}
    image = images(nets[0].eval(), clip, n=1)
    with torch.no_grad():
        for p in (p for net in nets for p in net.parameters()):
            p.add_(1.0)  # the import must replace every weight
    for (name, state), net in zip(files.items(), nets):
        net.load_state_dict(from_reference(net, state, name, "ViT-B-32-quickgelu at 224 px", "the random CLIP"))
        # key_map is a bijection (it checks that it covers every key), so equal files mean equal weights
        assert_bitwise_equal(dict(to_reference(net)), dict(state), name)
    assert torch.equal(images(nets[0], clip, n=1), image)


# --- the shrunk demo model, through files and the command line -------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n_samples=16, per_shard=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards):
    """(-S overrides, checkpoint) of a 2-step run: every part present, Adam state non-trivial."""
    args = tiny_overrides(tmp_path_factory.mktemp("trained"), shards, "train.max_steps=2")
    return args, Path(run(load_config("params.yaml", args, profile="demo"))["checkpoint"])


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "state_epoch_000.pth"
    assert main(["export-reference", str(trained[1]), str(out)]) == 0
    return out


def import_args(args, path, *extra):
    return ["import-reference", str(path), "--profile", "demo", *[a for o in args for a in ("-S", o)], *extra]


def save(obj, path):
    torch.save(obj, path)
    return path


def test_export_writes_the_reference_layout(trained, exported):
    raw = torch.load(exported, weights_only=True)
    assert set(raw) == {"model", "optimizers", "epoch"}
    for name, table in TABLES.items():
        state = raw["model"][name]
        assert all(k.startswith("module.") for k in state), "DDP-style keys load on every reference path"
        assert layout(OrderedDict((k.removeprefix("module."), v) for k, v in state.items())) == table(TINY), name
    # Reference optimizers index netG.parameters(), the frozen CLIP included (it never gets state).
    opt_g, table_g = raw["optimizers"]["optimizer_G"], net_g_table(TINY)
    assert opt_g["param_groups"][0]["params"] == list(range(len(table_g)))
    assert sorted(opt_g["state"]) == [i for i, (k, _) in enumerate(table_g) if "CLIP_ViT" not in k]
    opt_d, table_d = raw["optimizers"]["optimizer_D"], net_d_table(TINY) + net_c_table(TINY)
    assert opt_d["param_groups"][0]["params"] == list(range(len(table_d)))
    assert opt_d["state"] and all(tuple(s["exp_avg"].shape) == table_d[i][1] for i, s in opt_d["state"].items())


def test_export_import_round_trip_is_bit_identical(trained, exported, tmp_path, capsys):
    args, original = trained
    out = tmp_path / "imported.pt"
    assert main(import_args(args, exported, "--out", str(out))) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes and all("differs from the reference recipe" in n for n in notes), "a complete file: nothing starts fresh"
    a, b = load_checkpoint(original), load_checkpoint(out)
    for part in ("netG", "netD", "netC", "optG", "optD"):
        assert_bitwise_equal(b[part], a[part], part)
    assert b["step"] == 0 and b["origin"]["format"] == "tobran/GALIP" and b["origin"]["file"] == exported.name
    assert b["origin"]["parts"] == ["netG", "netD", "netC", "optG", "optD"] and len(b["origin"]["sha256"]) == 64
    g0, clip0, _ = load_generator(original)
    g0.load_state_dict(a["netG"])  # the reference format has no EMA: the trained weights travel
    g1, clip1, _ = load_generator(out)
    assert "netG_ema" in a and "netG_ema" not in b
    assert torch.equal(images(g1, clip1), images(g0, clip0))


def test_plain_and_module_prefixed_and_bare_state_dicts_import_alike(trained, exported, tmp_path):
    args = trained[0]
    raw = torch.load(exported, weights_only=True)
    plain = {"model": {n: OrderedDict((k.removeprefix("module."), v) for k, v in s.items()) for n, s in raw["model"].items()}}
    bare = plain["model"]["netG"]  # netG.state_dict() saved on its own
    outs = []
    for name, obj in (("plain", plain), ("bare", bare)):
        outs.append(tmp_path / f"{name}.pt")
        assert main(import_args(args, save(obj, tmp_path / f"{name}.pth"), "--out", str(outs[-1]))) == 0
    expected = load_checkpoint(trained[1])["netG"]
    for out in outs:
        assert_bitwise_equal(load_checkpoint(out)["netG"], expected, out.name)


def test_fp16_clip_weights_in_the_file_are_accepted(trained, exported, tmp_path):
    """Released files hold CLIP in the dtype it trained in (fp16 on CUDA): compare in that dtype."""
    raw = torch.load(exported, weights_only=True)
    g = raw["model"]["netG"]
    raw["model"]["netG"] = OrderedDict((k, v.half() if "CLIP_ViT" in k else v) for k, v in g.items())
    assert main(import_args(trained[0], save(raw, tmp_path / "fp16.pth"), "--out", str(tmp_path / "x.pt"))) == 0


def test_optimizers_saved_by_old_pytorch_import_and_step(trained, exported, tmp_path):
    """The reference trained on PyTorch 1.x: Adam kept `step` as an int and fewer param-group keys."""
    raw = torch.load(exported, weights_only=True)
    for opt in raw["optimizers"].values():
        opt["param_groups"] = [{k: g[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "params")} for g in opt["param_groups"]]
        for state in opt["state"].values():
            state["step"] = int(state["step"])
    out = tmp_path / "old.pt"
    assert main(import_args(trained[0], save(raw, tmp_path / "old.pth"), "--out", str(out))) == 0
    net_g, clip, cfg = load_generator(out)
    opt = torch.optim.Adam(net_g.parameters())
    opt.load_state_dict(load_checkpoint(out)["optG"])
    sent, _ = clip.encode_text(clip.tokenize(["a red square"]))
    net_g.train()(torch.randn(1, cfg.model.nz), sent).mean().backward()
    opt.step()
    assert int(opt.state[net_g.fc_code.weight]["step"]) == 3  # 2 training steps in the file, then this one


def test_generation_only_file_generates_and_fine_tunes_with_fresh_d(trained, exported, shards, tmp_path, capsys, caplog):
    raw = torch.load(exported, weights_only=True)
    gen_only = save({"model": {"netG": raw["model"]["netG"]}}, tmp_path / "netG_only.pth")
    args = tiny_overrides(tmp_path, shards, "train.max_steps=2")  # train.out_dir = tmp_path/run
    assert main(import_args(args, gen_only)) == 0
    assert "note: generation-only" in capsys.readouterr().err
    imported = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert imported.name == "ckpt_00000000.pt"
    assert main(import_args(args, gen_only)) == 2 and "already holds ckpt_00000000.pt" in capsys.readouterr().err
    assert {"netD", "netC", "optG", "optD"}.isdisjoint(load_checkpoint(imported))

    assert main(["generate", "--checkpoint", str(imported), "--prompt", "a red square", "--n", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()

    cfg = load_config("params.yaml", args, profile="demo")
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg)  # an import is a checkpoint like any other: training continues from it, never over it
    with caplog.at_level("WARNING", logger="galip.train"):
        result = run(cfg, resume=True)
    assert "holds no netD, netC, optG, optD, scalerG, scalerD" in caplog.text
    tuned = load_checkpoint(result["checkpoint"])
    assert tuned["step"] == 2 and tuned["origin"] == load_checkpoint(imported)["origin"], "provenance survives fine-tuning"


@pytest.mark.slow
def test_registering_an_import_records_its_origin_and_serves(trained, exported, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from galip.ops.registry import register_from_files

    args = trained[0]
    imported = tmp_path / "imported.pt"
    assert main(import_args(args, exported, "--out", str(imported))) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_config("params.yaml", [*args, "mlflow.experiment=imports"], profile="demo")
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("imports", artifact_location=(tmp_path / "artifacts").as_uri())
    result = register_from_files(cfg, None, imported, None)
    client = mlflow.MlflowClient(uri)
    tags = client.get_model_version(cfg.mlflow.model_name, result["version"]).tags
    assert tags["origin.format"] == "tobran/GALIP" and tags["origin.file"] == exported.name
    assert tags["origin.parts"] == "netG,netD,netC,optG,optD" and len(tags["origin.sha256"]) == 64
    assert not result["promoted"] and "no finite" in result["reason"], "without metrics the gate keeps champion"
    model = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.model_name}@challenger")
    out = model.predict(pd.DataFrame({"prompt": ["a red square on the left"]}), params={"n": 1, "seed": 0})
    assert len(out) == 1 and out["image"][0]


# --- wrong files: one line naming the first offending key, nothing written ---------------------------------
def other_architecture(trained, tmp_path):
    cfg = load_config("params.yaml", [*trained[0], "model.ngf=16"], profile="demo")
    g, _, _ = build_nets(cfg.model, training_clip(cfg))
    return save({"model": {"netG": to_reference(g)}}, tmp_path / "ngf16.pth")


def truncated(exported, tmp_path):
    data = exported.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.pth"


WRONG_FILES = {
    "other architecture": (lambda t, e, tmp: other_architecture(t, tmp), [], "'mapping.conv.weight' has shape [128, 128, 5, 5]"),
    "other CLIP": (lambda t, e, tmp: e, ["train.seed=7"], "'mapping.CLIP_ViT.class_embedding' [128]: the embedded CLIP weights differ"),
    "truncated file": (lambda t, e, tmp: truncated(e, tmp), [], "not a complete torch file"),
    "web page": (lambda t, e, tmp: (tmp / "p.pth").write_bytes(b"<!DOCTYPE html><html>") and tmp / "p.pth", [], "an HTML page"),
    "pickled object": (
        lambda t, e, tmp: save({"model": {}, "args": argparse.Namespace(lr=1)}, tmp / "o.pth"), [], "refused it (Unsupported global: GLOBAL argparse.Namespace)"
    ),
    "other format": (lambda t, e, tmp: save({"state_dict": {"w": torch.zeros(2)}}, tmp / "s.pth"), [], "top-level key 'state_dict' dict"),
    "ours already": (lambda t, e, tmp: t[1], [], "already a galip-mlops checkpoint"),
    "no generator": (lambda t, e, tmp: save({"model": {"netD": {}}}, tmp / "d.pth"), [], "'model' holds no netG"),
}


@pytest.mark.parametrize("case", WRONG_FILES)
def test_wrong_file_gives_one_line_and_writes_nothing(case, trained, exported, tmp_path, capsys):
    make, extra, message = WRONG_FILES[case]
    path = make(trained, exported, tmp_path)
    out = tmp_path / "out" / "imported.pt"
    capsys.readouterr()
    assert main(import_args([*trained[0], *extra], path, "--out", str(out))) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {path}: ") and message in err[0], err
    assert not (tmp_path / "out").exists()

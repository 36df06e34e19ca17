"""This project against the reference code (tobran/GALIP + openai/CLIP), side by side in one run.

    python bench/vs_reference.py                              # 3 alternated rounds -> bench/results/cpu_vs_reference.json
    python bench/vs_reference.py --baseline /tmp/base         # also an older checkout of galip, as a third side
    python bench/vs_reference.py --profile-ops bench/out/ops  # torch.profiler of one train step and one generation per side
    python bench/vs_reference.py --check                      # float64: the same weights give the reference's numbers
    python bench/vs_reference.py --table                      # render bench/README.md's vs-reference table
    python bench/vs_reference.py --table --check-table        # exit 1 if that table and the result file disagree

The reference code is never committed: fetch it into the git-ignored bench/reference/ first
(bench/reference/GALIP = github.com/tobran/GALIP, bench/reference/CLIP = github.com/openai/CLIP).
Shapes: ViT-B/32 at 224 px with random weights, batch 4, real images 256 px, fp32, 2 threads.

Each side runs in its own worker process (its own imports: the baseline side is another checkout of
galip on PYTHONPATH) and executes its own code path: the reference's training step is its
``lib.modules.train`` over a one-batch loader (it encodes real images with gradients on; we do not),
ours is ``Trainer.train_step`` (EMA included); generation is the reference's text encoding + ``netG(...,
eval=True)`` under no_grad against our ``generate_images`` (what ``galip generate`` and bench/generate.py
run). The only shim: the reference's fp32 MA-GP calls ``.cuda()`` on a tensor, which is the identity
here. The sides take turns, in an order that alternates between rounds, so drifts of the machine
hit every side alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "bench" / "reference"
OUT = ROOT / "bench" / "results" / "cpu_vs_reference.json"
FIDELITY = ROOT / "bench" / "results" / "cpu_vs_reference_fidelity.json"
BEGIN, END = "<!-- vs-reference:begin (bench/vs_reference.py --table) -->", "<!-- vs-reference:end -->"
BATCH, REAL_SIZE, NZ, SIM_W = 4, 256, 100, 4.0
PROMPTS = [f"a photo of object number {i}" for i in range(BATCH)]


# --- the reference side ------------------------------------------------------------------------------
def _import_reference(ref: Path):
    sys.path[:0] = [str(ref / "CLIP"), str(ref / "GALIP" / "code")]
    # lib.utils imports easydict for its YAML config loader, which this bench does not use.
    sys.modules.setdefault("easydict", types.SimpleNamespace(EasyDict=dict))
    import clip as openai_clip
    from clip.model import CLIP
    from lib import datasets, modules
    from models.GALIP import CLIP_IMG_ENCODER, CLIP_TXT_ENCODER, NetC, NetD, NetG

    return types.SimpleNamespace(clip=openai_clip, CLIP=CLIP, modules=modules, datasets=datasets, NetG=NetG, NetD=NetD, NetC=NetC,
                                 IMG=CLIP_IMG_ENCODER, TXT=CLIP_TXT_ENCODER)


def reference_models(ref: Path):
    r = _import_reference(ref)
    # OpenAI CLIP ViT-B/32 (clip.load's build_model for that checkpoint), random weights, fp32 as on CPU
    model = r.CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                   context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12).eval()
    # code/lib/perpare.py: encoders and nets from the one training CLIP; Adam as in code/src/train.py
    img_enc, txt_enc = r.IMG(model).eval(), r.TXT(model).eval()
    net_g, net_d, net_c = r.NetG(64, NZ, 512, 256, 3, False, model), r.NetD(64, 256, 3, False), r.NetC(64, 512, False)
    return r, model, img_enc, txt_enc, net_g, net_d, net_c


class Reference:
    def __init__(self, ref: Path) -> None:
        r, self.model, self.img_enc, self.txt_enc, self.net_g, self.net_d, self.net_c = reference_models(ref)
        self.r = r
        self.opt_d = torch.optim.Adam(list(self.net_d.parameters()) + list(self.net_c.parameters()), lr=4e-4, betas=(0.0, 0.9))
        self.opt_g = torch.optim.Adam(self.net_g.parameters(), lr=1e-4, betas=(0.0, 0.9))
        self.args = argparse.Namespace(batch_size=BATCH, device=torch.device("cpu"), current_epoch=0, max_epoch=1, z_dim=NZ,
                                       multi_gpus=False, mixed_precision=False, sim_w=SIM_W, scaler_min=64)
        images = torch.rand(BATCH, 3, REAL_SIZE, REAL_SIZE) * 2 - 1
        self.batch = (images, PROMPTS, r.clip.tokenize(PROMPTS), list(range(BATCH)))

    def train(self) -> None:
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t  # MA_GP_FP32's torch.ones(...).cuda()
        try:
            self.r.modules.train([self.batch], self.net_g, self.net_d, self.net_c, self.txt_enc, self.img_enc,
                                 self.opt_g, self.opt_d, None, None, self.args)
        finally:
            torch.Tensor.cuda = cuda

    def generate(self) -> torch.Tensor:
        # code/lib/modules.py sample(): tokens -> encode_tokens -> netG(noise, sent, eval=True) under no_grad
        self.net_g.eval()
        tokens = self.r.clip.tokenize(PROMPTS)
        sent, _ = self.r.datasets.encode_tokens(self.txt_enc, tokens)
        with torch.no_grad():
            return torch.clamp(self.net_g(torch.randn(BATCH, NZ), sent, eval=True).float(), -1.0, 1.0)


# --- this project's side -----------------------------------------------------------------------------
def project_config():
    import galip
    from galip.config import load_config

    # the params.yaml of the checkout whose galip this worker imports (a baseline may know other keys)
    return load_config(str(Path(galip.__file__).resolve().parents[1] / "params.yaml"), ["model.clip_pretrained=", "train.precision=fp32", "train.device=cpu"], "cc12m")


class Project:
    def __init__(self) -> None:
        from galip.eval.generate import generate_images
        from galip.model.precision import Precision
        from galip.train.distributed import DistEnv
        from galip.train.trainer import Trainer

        cfg = project_config()
        dev = torch.device("cpu")
        self.trainer = Trainer.create(cfg, DistEnv(device=dev))
        images = torch.rand(BATCH, 3, cfg.data.crop_size, cfg.data.crop_size) * 2 - 1
        self.batch = [(images, self.trainer.clip.tokenize(PROMPTS))]
        self.precision = Precision.resolve("fp32", dev)
        self.generate_images = generate_images

    def train(self) -> None:
        self.trainer.train_step(self.batch)

    def generate(self) -> torch.Tensor:
        # bench/generate.py: the sampling / evaluation / serving path
        return self.generate_images(self.trainer.net_g, self.trainer.clip, PROMPTS, n=1, batch_size=BATCH, precision=self.precision)


# --- worker: one side per process, driven over a pipe ----------------------------------------------------
def _timed(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _profile(fn: Callable[[], Any], out: Path, rows: int = 30) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        fn()
    avgs = prof.key_averages()
    out.write_text(avgs.table(sort_by="self_cpu_time_total", row_limit=rows))
    total = sum(e.self_cpu_time_total for e in avgs)
    top = sorted(avgs, key=lambda e: -e.self_cpu_time_total)[:rows]
    return {"total_self_ms": round(total / 1e3, 1),
            "top": [[e.key, round(e.self_cpu_time_total / 1e3, 1), e.count] for e in top]}


def worker(side: str, threads: int, ref: Path) -> None:
    chan = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the code under test prints goes to stderr, the pipe carries only replies
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    impl = Reference(ref) if side == "reference" else Project()
    import galip

    chan.write(json.dumps({"ready": side, "galip": str(Path(galip.__file__).parent)}) + "\n")
    chan.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        fn = getattr(impl, cmd["what"])
        if cmd["op"] == "time":
            reply = {"times": _timed(fn, cmd["iters"], cmd["warmup"])}
        else:
            reply = _profile(fn, Path(cmd["out"]))
        chan.write(json.dumps(reply) + "\n")
        chan.flush()


class Side:
    def __init__(self, name: str, galip_root: Path, threads: int, ref: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(galip_root)}
        cmd = [sys.executable, __file__, "--worker", "reference" if name == "reference" else "project", "--threads", str(threads), "--reference", str(ref)]
        self.name, self.proc = name, subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited (code {self.proc.wait()})")
        return json.loads(line)

    def ask(self, **cmd) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _summary(times: dict[str, list[list[float]]]) -> dict[str, Any]:
    """Per side: per-round mean, median and min over all timed iterations; ratios = reference time / side time
    (speed relative to the reference, above 1 = faster), per round (means) and overall (medians, mins)."""
    out: dict[str, Any] = {}
    ref = times["reference"]
    for side, rounds in times.items():
        flat = [t for r in rounds for t in r]
        s = {"round_mean_s": [round(statistics.mean(r), 4) for r in rounds],
             "median_s": round(statistics.median(flat), 4), "min_s": round(min(flat), 4)}
        if side != "reference":
            s["ratio_per_round"] = [round(statistics.mean(a) / statistics.mean(b), 3) for a, b in zip(ref, rounds)]
            s["ratio_median"] = round(statistics.median([t for r in ref for t in r]) / statistics.median(flat), 3)
            s["ratio_min"] = round(min(t for r in ref for t in r) / min(flat), 3)
        out[side] = s
    return out


def _autogroup() -> str:
    try:
        return Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        return ""


def bench(args: argparse.Namespace) -> None:
    """One worker alive at a time (each side holds ~4 GB at its peak): per round, every side in turn
    starts, times its training step and then generation, and exits; the order alternates per round."""
    sides = [("reference", ROOT), ("project", ROOT)] + ([("baseline", Path(args.baseline))] if args.baseline else [])
    result: dict[str, Any] = {"bench": "vs_reference", "batch": BATCH, "image_size": 224, "real_image_size": REAL_SIZE,
                              "clip_model": "ViT-B/32 (random weights)", "precision": "fp32", "torch_threads": args.threads,
                              "rounds": args.rounds, "warmup": args.warmup, "iters": args.iters, "host": platform.node(),
                              "cpus": os.cpu_count(), "torch": torch.__version__, "scheduler_autogroup": _autogroup(),
                              "uptime_start": _uptime()}
    if args.profile_ops:
        out = Path(args.profile_ops)
        out.mkdir(parents=True, exist_ok=True)
        for name, root in sides:
            w = Side(name, root, args.threads, args.reference)
            for what in ("train", "generate"):
                rep = w.ask(op="profile", what=what, out=str(out / f"{name}_{what}.txt"))
                print(f"{name} {what}: {rep['total_self_ms']} ms self CPU", file=sys.stderr)
                (out / f"{name}_{what}.json").write_text(json.dumps(rep, indent=1))
            w.close()
        return
    times: dict[str, dict[str, list[list[float]]]] = {what: {n: [] for n, _ in sides} for what in ("train", "generate")}
    for rnd in range(args.rounds):
        for name, root in sides if rnd % 2 == 0 else sides[::-1]:
            w = Side(name, root, args.threads, args.reference)
            result.setdefault("galip_imported_from", {})[name] = w.hello["galip"]
            for what in ("train", "generate"):
                times[what][name].append(w.ask(op="time", what=what, iters=args.iters, warmup=args.warmup)["times"])
                print(f"{what} round {rnd} {name}: {[round(t, 3) for t in times[what][name][-1]]}", file=sys.stderr)
            w.close()
    for what in ("train", "generate"):
        result[what] = {"times_s": {k: [[round(t, 4) for t in r] for r in v] for k, v in times[what].items()}, **_summary(times[what])}
    result["uptime_end"] = _uptime()
    result["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if args.baseline:
        result["baseline_commit"] = subprocess.run(["git", "-C", args.baseline, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if args.note:
        result["note"] = args.note
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: {s: {m: v for m, v in d.items() if m != "round_mean_s"} for s, d in result[k].items() if s != "times_s"} for k in ("train", "generate")}))


# --- fidelity: the same weights and inputs through both codes, float64 --------------------------------
def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def check(ref_dir: Path, dtype: torch.dtype = torch.float64, tol: float = 1e-12, out: Path | None = None) -> int:
    """Transplant our random weights into the reference's modules (galip's own export key map), then
    compare the CLIP views, NetG, NetD/NetC, the D loss with MA-GP and the G loss, and every parameter
    gradient of both phases, in float64 (or ``dtype``). Prints the largest relative difference of each; exit 1 above ``tol``."""
    from galip.model.clip import clip_from_config
    from galip.model import losses
    from galip.model.models import build_nets
    from galip.train.reference_format import key_map, to_reference

    torch.manual_seed(0)
    cfg = project_config()
    clip = clip_from_config(cfg.model)
    ours = build_nets(cfg.model, clip)
    r, model, img_enc, txt_enc, *refs = reference_models(ref_dir)
    # OpenAI's LayerNorm computes in float32 whatever its input (for fp16 weights); for a float64 comparison
    # it runs as torch's LayerNorm, which is what it does on float32 inputs.
    sys.modules["clip.model"].LayerNorm.forward = torch.nn.LayerNorm.forward
    model.load_state_dict(clip.model.state_dict(), strict=True)
    for mine, theirs in zip(ours, refs):
        theirs.load_state_dict(to_reference(mine), strict=True)
    for m in (clip, model, *ours, *refs):
        m.to(dtype)
    real = (torch.rand(BATCH, 3, REAL_SIZE, REAL_SIZE) * 2 - 1).to(dtype)
    noise = torch.randn(BATCH, NZ).to(dtype)
    tokens = clip.tokenize(PROMPTS)
    assert torch.equal(tokens, r.clip.tokenize(PROMPTS)), "tokenizers differ"
    g, d, c = ours
    rg, rd, rc = refs
    diffs: dict[str, float] = {}

    with torch.no_grad():
        sent, words = clip.encode_text(tokens)
        r_sent, r_words = txt_enc(tokens)
        diffs["sentence embedding"] = _max_rel(sent, r_sent)
        diffs["token features"] = _max_rel(words, r_words)
        feats, emb = clip.image_features(real)
        r_feats, r_emb = img_enc(real)
        diffs["CLIP image features (blocks 1, 4, 8)"] = _max_rel(feats, r_feats)
        diffs["CLIP image embedding"] = _max_rel(emb, r_emb)
        diffs["NetG forward (no grad)"] = _max_rel(g(noise, sent), rg(noise, r_sent, eval=True))

    # D phase as each code writes it; both differentiate w.r.t. the real CLIP features and the sentence
    def d_phase(is_ref: bool):
        net_g, net_d, net_c = (rg, rd, rc) if is_ref else (g, d, c)
        s = sent.clone().requires_grad_(True)
        f = feats.clone().requires_grad_(True)
        fake = net_g(noise, s)
        if is_ref:
            out_real = net_d(f)
            pred_real, err_real = r.modules.predict_loss(net_c, out_real, s, negtive=False)
            _, err_mis = r.modules.predict_loss(net_c, out_real, torch.cat((s[1:], s[0:1]), dim=0).detach(), negtive=True)
            fake_feats, fake_emb = img_enc(fake)
            _, err_fake = r.modules.predict_loss(net_c, net_d(fake_feats.detach()), s, negtive=True)
            cuda = torch.Tensor.cuda
            torch.Tensor.cuda = lambda t, *a, **k: t
            try:
                magp = r.modules.MA_GP_FP32(f, s, pred_real)
            finally:
                torch.Tensor.cuda = cuda
            loss = err_real + (err_fake + err_mis) / 2.0 + magp
        else:
            out_real = net_d(f)
            real_logits = net_c(out_real, s)
            mis_logits = net_c(out_real, losses.mismatched(s).detach())
            fake_feats, fake_emb = clip.image_features(fake)
            fake_logits = net_c(net_d(fake_feats.detach()), s)
            magp = losses.ma_gp(real_logits, f, s, cfg.train.magp_k, cfg.train.magp_p)
            loss = losses.d_hinge(real_logits, fake_logits, mis_logits) + magp
        loss.backward()
        return loss, magp, fake, fake_feats, fake_emb, s

    def g_phase(is_ref: bool, fake_feats, fake_emb, s):
        net_d, net_c = (rd, rc) if is_ref else (d, c)
        logits = net_c(net_d(fake_feats), s)
        if is_ref:  # code/lib/modules.py train(), inline there
            loss = -logits.mean() - SIM_W * torch.cosine_similarity(fake_emb, s).mean()
        else:
            loss = losses.g_loss(logits, fake_emb, s, cfg.train.sim_w)
        loss.backward()
        return loss

    def grads(m) -> dict[str, torch.Tensor]:
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    results = {}
    for is_ref in (False, True):
        nets = refs if is_ref else ours
        for m in nets:
            m.zero_grad(set_to_none=True)
        loss_d, magp, fake, fake_feats, fake_emb, s = d_phase(is_ref)
        d_grads = (grads(nets[1]), grads(nets[2]))
        for m in nets:
            m.zero_grad(set_to_none=True)
        loss_g = g_phase(is_ref, fake_feats, fake_emb, s)
        results[is_ref] = (loss_d, magp, fake, loss_g, d_grads, grads(nets[0]))
    (ld, mg, fk, lg, gd, gg), (rld, rmg, rfk, rlg, rgd, rgg) = results[False], results[True]
    diffs["NetG forward (train)"] = _max_rel(fk, rfk)
    diffs["MA-GP"] = _max_rel(mg, rmg)
    diffs["D loss"] = _max_rel(ld, rld)
    diffs["G loss"] = _max_rel(lg, rlg)

    def worst(net, mine: dict, theirs: dict) -> float:
        # our parameter names -> the reference's, through the export key map; the same set must get gradients
        names = {e.ours: e.reference for e in key_map(net) if not e.frozen}
        assert {names[n] for n in mine} == set(theirs), f"{type(net).__name__}: different parameters got gradients"
        return max(_max_rel(v, theirs[names[n]]) for n, v in mine.items())

    diffs["NetD, NetC parameter gradients (D phase)"] = max(worst(d, gd[0], rgd[0]), worst(c, gd[1], rgd[1]))
    diffs["NetG parameter gradients (G phase)"] = worst(g, gg, rgg)
    width = max(map(len, diffs))
    for k, v in diffs.items():
        print(f"{k:<{width}}  max |diff| / max(1, max |ref|) = {v:.2e}")
    bad = [k for k, v in diffs.items() if not v <= tol]
    print(f"{'FAIL: ' + ', '.join(bad) if bad else 'all equal'} ({dtype}, tolerance {tol:g})")
    if out is not None:
        record = json.loads(out.read_text()) if out.exists() else {}
        record[str(dtype).removeprefix("torch.")] = {"max_rel_diff": diffs, "tolerance": tol, "passed": not bad}
        out.write_text(json.dumps(record, indent=1) + "\n")
    return 1 if bad else 0


# --- README table -----------------------------------------------------------------------------------------
def render(path: Path = OUT) -> str:
    r = json.loads(path.read_text())
    lines = [BEGIN, f"{r['clip_model']}, batch {r['batch']}, {r['precision']}, {r['torch_threads']} threads, "
             f"{r['rounds']} alternated rounds of {r['warmup']} warm-up + {r['iters']} timed iterations "
             f"(`{path.relative_to(ROOT)}`, commit {r['commit']}{', baseline ' + r['baseline_commit'] if 'baseline_commit' in r else ''}; "
             f"load at start: {r['uptime_start'].split('load average: ')[-1]}, at end: {r['uptime_end'].split('load average: ')[-1]}). "
             "Speed ratio = reference time / side time (above 1: faster than the reference).", "",
             "| what | side | s/iter per round (mean) | median s/iter | min s/iter | ratio per round | ratio of medians | ratio of mins |",
             "|---|---|---|---|---|---|---|---|"]
    for what in ("train", "generate"):
        for side, s in r[what].items():
            if side == "times_s":
                continue
            per_round = ", ".join(f"{v:.3f}" for v in s["round_mean_s"])
            ratios = ", ".join(f"{v:.2f}" for v in s.get("ratio_per_round", [])) or "-"
            lines.append(f"| {what} | {side} | {per_round} | {s['median_s']:.3f} | {s['min_s']:.3f} | {ratios} | "
                         f"{s.get('ratio_median', 1.0):.2f} | {s.get('ratio_min', 1.0):.2f} |")
    if FIDELITY.exists():
        fid = json.loads(FIDELITY.read_text())
        dtypes = list(fid)
        lines += ["", f"Fidelity (`python bench/vs_reference.py --check [--check-dtype float32]`, `{FIDELITY.relative_to(ROOT)}`): "
                  "the same random weights in both codes; largest |ours - reference| / max(1, max |reference|):", "",
                  "| compared | " + " | ".join(dtypes) + " |", "|---|" + "---|" * len(dtypes)]
        for name in fid[dtypes[0]]["max_rel_diff"]:
            lines.append(f"| {name} | " + " | ".join(f"{fid[d]['max_rel_diff'][name]:.1e}" for d in dtypes) + " |")
    return "\n".join(lines + [END])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, default=REFERENCE)
    p.add_argument("--baseline", default="", help="root of another galip checkout, benched as a third side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--note", default="")
    p.add_argument("--profile-ops", default="", help="folder for torch.profiler tables (no timing run)")
    p.add_argument("--check", action="store_true", help="float64 fidelity against the reference code")
    p.add_argument("--check-dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--tol", type=float, default=1e-12)
    p.add_argument("--table", action="store_true")
    p.add_argument("--check-table", action="store_true")
    p.add_argument("--worker", choices=["reference", "project"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.threads, args.reference)
        return 0
    if args.table:
        sys.path.insert(0, str(ROOT / "bench"))
        from _readme import BENCH_README, sync_block

        return sync_block(BEGIN, END, render(), args.check_table, "python bench/vs_reference.py --table", BENCH_README)
    if args.check:
        return check(args.reference, getattr(torch, args.check_dtype), args.tol, FIDELITY)
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

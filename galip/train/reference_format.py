"""Checkpoints of the reference GALIP code (github tobran/GALIP): import into ours, export to it.

The reference saves ``{'model': {'netG', 'netD', 'netC'}, 'optimizers': {'optimizer_G',
'optimizer_D'}, 'epoch'}`` (code/lib/utils.py, code/lib/modules.py); state-dict keys carry
``module.`` when saved from DDP, and the released pretrained files may hold only some parts. Its
NetG owns OpenAI CLIP's visual tower inside the mapper (``mapping.CLIP_ViT``), so its state dict
carries those frozen weights as well; ours holds CLIP by reference. On import they must equal the
configured CLIP; on export they are written from it.

    galip import-reference galip_cc12m.pth [--profile cc12m] [--out CKPT]
    galip export-reference runs/cc12m/checkpoints/ckpt_00020000.pt state_epoch_000.pth
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .checkpoint import atomic_save, checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint, training_clip
from ..config import Config, config_from_dict
from ..errors import MissingInputError, OutputExistsError, UserError
from ..model.models import build_nets

FORMAT_NAME = "tobran/GALIP"
DDP_PREFIX = "module."
CLIP_PREFIX = "clip.visual."  # our key for a frozen CLIP tensor: NetG.clip.visual.<open_clip key>

# --- the key map ----------------------------------------------------------------------------------
# For each of our module classes: its parameters and children as (our name, reference name), in the
# order the reference module registers them (code/models/GALIP.py; OpenAI CLIP's clip/model.py).
# That order is the reference's state-dict order and parameters() order, so also the order of the
# parameter indices in its saved optimizers. A module's own parameters precede its children in both.
# Classes not listed have the same names in the same order on both sides: Affine, DFBlock (DFBLK),
# Sequential, ModuleList, Linear, Conv2d, LayerNorm, MultiheadAttention, open_clip's Transformer.
REFERENCE_TREE: dict[str, tuple[tuple[str, str], ...]] = {
    # NetG registers fc_code, mapping (CLIP_Adapter: FBlocks, conv_fuse, CLIP_ViT, conv, fc_prompt),
    # GBlocks, to_rgb. CLIP_ViT is a CLIP_Mapper around OpenAI CLIP's `visual`; ours is FrozenCLIP.
    "NetG": (
        ("fc_code", "fc_code"),
        ("mapper_blocks", "mapping.FBlocks"),
        ("conv_fuse", "mapping.conv_fuse"),
        ("clip.visual", "mapping.CLIP_ViT"),
        ("conv_mapped", "mapping.conv"),
        ("fc_prompt", "mapping.fc_prompt"),
        ("g_blocks", "GBlocks"),
        ("to_rgb", "to_rgb"),
    ),
    "MBlock": (("conv1", "conv1"), ("fuse1", "fuse1"), ("conv2", "conv2"), ("fuse2", "fuse2"), ("c_sc", "c_sc")),
    "GBlock": (("c1", "c1"), ("c2", "c2"), ("fuse1", "fuse1"), ("fuse2", "fuse2"), ("c_sc", "c_sc")),
    "NetD": (("blocks", "DBlocks"), ("main", "main")),
    "DBlock": (("gamma", "gamma"), ("beta", "beta"), ("conv_r", "conv_r"), ("conv_s", "conv_s")),
    # CLIP_Mapper.define_module takes conv1, class_embedding, positional_embedding, ln_pre and
    # transformer from `visual` (the two embeddings are its own parameters, so they come first).
    "VisionTransformer": (
        ("class_embedding", "class_embedding"),
        ("positional_embedding", "positional_embedding"),
        ("conv1", "conv1"),
        ("ln_pre", "ln_pre"),
        ("transformer", "transformer"),
    ),
    # OpenAI registers attn, ln_1, mlp, ln_2; open_clip ln_1, attn, ls_1, ln_2, mlp, ls_2 (the ls_*
    # layer scales are parameter-free Identity for OpenAI-style models).
    "ResidualAttentionBlock": (("attn", "attn"), ("ln_1", "ln_1"), ("mlp", "mlp"), ("ln_2", "ln_2")),
}
# Parts of our modules that the reference's counterpart leaves out on purpose (the mapper does not
# use CLIP's output head).
NOT_IN_REFERENCE: dict[str, tuple[str, ...]] = {"VisionTransformer": ("ln_post", "proj")}

# Our checkpoint key -> where the reference keeps it.
PARTS: dict[str, tuple[str, str]] = {
    "netG": ("model", "netG"),
    "netD": ("model", "netD"),
    "netC": ("model", "netC"),
    "optG": ("optimizers", "optimizer_G"),
    "optD": ("optimizers", "optimizer_D"),
}

# What the reference code hard-codes (code/models/GALIP.py, code/cfg/*.yml): a model that differs
# converts both ways but does not run in the reference code, and released weights expect these.
REFERENCE_RECIPE: dict[str, Any] = {
    "clip_model": "ViT-B-32-quickgelu",
    "image_size": 224,
    "nz": 100,
    "ngf": 64,
    "ndf": 64,
    "code_channels": 64,
    "code_mid_channels": 32,
    "mapper_blocks": 4,
    "feature_blocks": (1, 4, 8),
    "prompt_blocks": (1, 2, 3, 4, 5, 6, 7, 8),
    "pixel_norm": "reference",
}


class ReferenceFormatError(UserError, ValueError):
    """A reference checkpoint does not fit the configured model; one line naming the first offending key."""


@dataclass(frozen=True)
class Entry:
    ours: str  # our state-dict key, or CLIP_PREFIX + open_clip key for the frozen CLIP tower
    reference: str  # the reference state-dict key (without DDP's "module.")
    shape: tuple[int, ...]

    @property
    def frozen(self) -> bool:
        return self.ours.startswith(CLIP_PREFIX)


def _has_state(module: nn.Module, name: str) -> bool:
    if name in module._parameters:
        return module._parameters[name] is not None
    if name in module._buffers:
        return module._buffers[name] is not None and name not in module._non_persistent_buffers_set
    child = module._modules.get(name)
    return child is not None and len(child.state_dict()) > 0


def _named_slots(module: nn.Module) -> list[tuple[str, str]]:
    kind = type(module).__name__
    own = [*module._parameters, *module._buffers, *module._modules]
    table = REFERENCE_TREE.get(kind)
    if table is None:
        return [(n, n) for n in own if _has_state(module, n)]
    listed = {ours.split(".")[0] for ours, _ in table} | set(NOT_IN_REFERENCE.get(kind, ()))
    for name in own:
        if name not in listed and _has_state(module, name):
            raise ReferenceFormatError(f"our {kind} has {name!r}, which the reference's {kind} lacks: no reference-format equivalent")
    return list(table)


def _resolve(module: nn.Module, dotted: str) -> Any:
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def _walk(module: nn.Module, ours: str = "", ref: str = "") -> Iterator[tuple[str, str, torch.Tensor]]:
    for our_name, ref_name in _named_slots(module):
        target = _resolve(module, our_name)
        if isinstance(target, torch.Tensor):
            yield ours + our_name, ref + ref_name, target
        elif isinstance(target, nn.Module):
            yield from _walk(target, f"{ours}{our_name}.", f"{ref}{ref_name}.")


def our_tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s state dict plus, for NetG, the frozen CLIP visual tower under CLIP_PREFIX."""
    tensors = dict(net.state_dict())
    clip = getattr(net, "clip", None)
    if clip is not None:
        tensors.update(clip.visual.state_dict(prefix=CLIP_PREFIX))
    return tensors


def key_map(net: nn.Module) -> list[Entry]:
    """Every tensor of the reference counterpart of ``net``, in the reference's order, with our key."""
    entries = [Entry(o, r, tuple(t.shape)) for o, r, t in _walk(net)]
    covered = {e.ours for e in entries if not e.frozen}
    if covered != set(net.state_dict()):
        lost = sorted(set(net.state_dict()) ^ covered)
        raise ReferenceFormatError(f"{type(net).__name__}: REFERENCE_TREE does not cover {lost[:3]} (update galip/train/reference_format.py)")
    return entries


def to_reference(net: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The reference state dict of ``net`` (NetG's includes the frozen CLIP tower it embeds)."""
    tensors = our_tensors(net)
    return OrderedDict((e.reference, tensors[e.ours]) for e in key_map(net))


def strip_ddp(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k.removeprefix(DDP_PREFIX): v for k, v in state.items()}


def _shape(t: Any) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def from_reference(net: nn.Module, state: Mapping[str, Any], part: str, arch: str, clip_desc: str) -> dict[str, torch.Tensor]:
    """Our state dict for ``net`` from its reference state dict; the embedded CLIP tensors must equal ours.

    Checks run in the file's key order first (unknown key, wrong shape), then missing keys and
    values, so the error names the first offending key.
    """
    entries = key_map(net)
    by_ref = {e.reference: e for e in entries}
    state = strip_ddp(state)
    for key, value in state.items():
        entry = by_ref.get(key)
        if entry is None or not isinstance(value, torch.Tensor):
            raise ReferenceFormatError(f"{part} key {key!r} {_shape(value)} is not part of GALIP's {part} for {arch}")
        if tuple(value.shape) != entry.shape:
            raise ReferenceFormatError(f"{part} key {key!r} has shape {_shape(value)}; {arch} expects {list(entry.shape)}")
    for e in entries:
        if e.reference not in state:
            raise ReferenceFormatError(f"{part} key {e.reference!r} {list(e.shape)} is missing (truncated or partial state dict)")
    mine = our_tensors(net)
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        value = state[e.reference]
        if not value.is_floating_point():
            raise ReferenceFormatError(f"{part} key {e.reference!r} {_shape(value)} holds {value.dtype}, not floating point")
        if e.frozen:
            # Released files keep CLIP in the dtype it trained in (fp16 on CUDA): compare in that dtype.
            ours = mine[e.ours].to(value.dtype)
            if not torch.equal(ours, value):
                diff = (ours.float() - value.float()).abs().max().item()
                raise ReferenceFormatError(
                    f"{part} key {e.reference!r} {_shape(value)}: the embedded CLIP weights differ from {clip_desc} "
                    f"(max |diff| {diff:.3g}); import with the CLIP this model was trained with (-S model.clip_pretrained=...)"
                )
        elif not torch.isfinite(value).all():
            raise ReferenceFormatError(f"{part} key {e.reference!r} {_shape(value)} holds NaN or inf (a diverged run?)")
        else:
            out[e.ours] = value
    return out


# --- optimizers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamOrder:
    """The parameters one optimizer covers, in our order and in the reference's, and how they pair."""

    ours: list[str]
    reference: list[str]
    to_ours: dict[str, str | None]  # reference key -> our key (None: frozen CLIP, no optimizer state)
    shapes: dict[str, tuple[int, ...]]  # by either key

    @classmethod
    def of(cls, nets: Mapping[str, nn.Module]) -> "ParamOrder":
        """Keys are prefixed with the net's name, since one optimizer may cover several nets (D and C)."""
        ours, reference, to_ours, shapes = [], [], {}, {}
        for name, net in nets.items():
            ours += [f"{name}.{k}" for k, _ in net.named_parameters()]
            for e in key_map(net):
                ref = f"{name}.{e.reference}"
                reference.append(ref)
                to_ours[ref] = None if e.frozen else f"{name}.{e.ours}"
                shapes[ref] = shapes[f"{name}.{e.ours}"] = e.shape
        return cls(ours, reference, to_ours, shapes)

    def to_reference(self) -> dict[str, str]:
        return {o: r for r, o in self.to_ours.items() if o is not None}


def remap_optimizer(
    state: Any, src: Sequence[str], dst: Sequence[str], src_to_dst: Mapping[str, str | None], shapes: Mapping[str, tuple[int, ...]], what: str
) -> dict[str, Any]:
    """A one-group torch optimizer state dict over parameters ``src`` re-indexed for parameters ``dst``.

    Saved optimizers refer to parameters by position, so the state moves by key; parameters without
    a counterpart (the frozen CLIP, which never has state) are dropped, and ``dst`` parameters
    without state start fresh.
    """
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(state.get("state"), Mapping):
        raise ReferenceFormatError(f"{what} is not a one-group torch optimizer state dict")
    ids = list(groups[0].get("params", []))
    if len(ids) != len(src):
        raise ReferenceFormatError(f"{what} covers {len(ids)} parameters; the network has {len(src)} (another architecture)")
    dst_index = {k: i for i, k in enumerate(dst)}
    out: dict[int, dict[str, Any]] = {}
    for pid, key in zip(ids, src):
        saved, target = state["state"].get(pid), src_to_dst.get(key)
        if saved is None or target is None:
            continue
        for name, value in saved.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != shapes[key]:
                raise ReferenceFormatError(f"{what} {name} of {key!r} has shape {_shape(value)}; the parameter has {list(shapes[key])}")
        out[dst_index[target]] = dict(saved)
    return {"state": out, "param_groups": [{**groups[0], "params": list(range(len(dst)))}]}


# --- files ----------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = (found.group(1) if found else text).strip().splitlines()
    return line[0].split(" was not an allowed global")[0].strip() if line else type(exc).__name__


def read_reference(path: Path) -> Any:
    """torch.load(weights_only=True): tensors and containers only, never arbitrary pickled objects."""
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file (download the released model first; see README)")
    with open(path, "rb") as fh:
        head = fh.read(64).lstrip()
    if head[:1] == b"<":
        raise ReferenceFormatError(f"{path}: an HTML page, not a checkpoint (a cloud-drive download saved its web page): download the file itself")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _first_line(exc)
        if "Unsupported global" not in reason:
            raise ReferenceFormatError(f"{path}: not a readable torch file ({reason}); download it again") from None
        raise ReferenceFormatError(
            f"{path}: torch.load(weights_only=True) refused it ({reason}); GALIP's own files hold only tensors. "
            f"If you trust its source, keep just the weights with: python -c \"import torch; c = torch.load('{path}', "
            "weights_only=False); torch.save({k: c[k] for k in ('model', 'optimizers', 'epoch') if k in c}, "
            "'weights.pth')\" and import weights.pth"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ReferenceFormatError(
            f"{path}: not a complete torch file ({type(exc).__name__}: {_first_line(exc).split('. ')[0] or 'empty'}); "
            "the download was probably cut short: download it again"
        ) from None


def reference_parts(raw: Any) -> tuple[dict[str, Any], Any]:
    """(our part name -> reference object, epoch) from a loaded reference file."""
    if not isinstance(raw, Mapping):
        raise ReferenceFormatError(f"holds a {type(raw).__name__}, not a {FORMAT_NAME} checkpoint dict")
    if "format_version" in raw and "netG" in raw:
        raise ReferenceFormatError("is already a galip-mlops checkpoint: use it directly (--checkpoint, --resume)")
    if "model" not in raw:
        first = next(iter(raw), None)
        if isinstance(first, str) and first.removeprefix(DDP_PREFIX) == "fc_code.weight":
            raw = {"model": {"netG": raw}}  # a bare NetG state dict (netG.state_dict() saved alone)
        else:
            value = raw.get(first) if first is not None else None
            raise ReferenceFormatError(
                f"top-level key {first!r} {_shape(value)} is not part of the {FORMAT_NAME} format "
                "{'model': {'netG', 'netD', 'netC'}, 'optimizers': {...}, 'epoch'}"
            )
    parts = {}
    for ours, (section, name) in PARTS.items():
        holder = raw.get(section)
        if isinstance(holder, Mapping) and holder.get(name) is not None:
            parts[ours] = holder[name]
    if "netG" not in parts:
        raise ReferenceFormatError("'model' holds no netG: nothing to generate with")
    return parts, raw.get("epoch")


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def recipe_differences(cfg: Config, clip) -> list[str]:
    """Settings in which ``cfg`` departs from what the reference code hard-codes."""
    resolved = {**cfg.model.model_dump(), "feature_blocks": tuple(clip.feature_blocks), "prompt_blocks": tuple(clip.prompt_blocks)}
    return [f"model.{k}={resolved[k]!r} (reference: {v!r})" for k, v in REFERENCE_RECIPE.items() if resolved[k] != v]


def _describe(cfg: Config) -> tuple[str, str]:
    m = cfg.model
    arch = f"model.clip_model={m.clip_model} at model.image_size={m.image_size} (ngf {m.ngf}, ndf {m.ndf})"
    return arch, f"model.clip_model={m.clip_model} model.clip_pretrained={m.clip_pretrained!r}"


def _import_target(cfg: Config, out: Path | None) -> Path:
    if out is not None:
        if out.exists():
            raise OutputExistsError(f"--out {out} exists; remove it or pass another path")
        return out
    ckpt_dir = Path(cfg.train.out_dir) / "checkpoints"
    existing = latest_checkpoint(ckpt_dir)
    if existing is not None:
        raise OutputExistsError(f"{ckpt_dir} already holds {existing.name}; pass --out PATH or -S train.out_dir=<new folder>")
    return checkpoint_path(ckpt_dir, 0)


def import_reference(cfg: Config, path: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write our checkpoint (step 0, ``cfg``, origin recorded) from a reference checkpoint file.

    Every check runs before anything is written; a missing discriminator or optimizer gives a
    checkpoint that generates, evaluates and registers, and whose fine-tuning starts those fresh.
    """
    path = Path(path)
    target = _import_target(cfg, Path(out) if out is not None else None)
    raw = read_reference(path)
    try:
        parts, epoch = reference_parts(raw)
    except ReferenceFormatError as exc:
        raise ReferenceFormatError(f"{path}: {exc}") from None
    clip = training_clip(cfg)
    nets = dict(zip(("netG", "netD", "netC"), build_nets(cfg.model, clip)))
    arch, clip_desc = _describe(cfg)
    notes: list[str] = []
    if ("netD" in parts) != ("netC" in parts):
        notes.append(f"the file has only {'netD' if 'netD' in parts else 'netC'}: D and C start fresh together")
        for name in ("netD", "netC"):
            parts.pop(name, None)
    payload: dict[str, Any] = {"step": 0, "config": cfg.to_dict()}
    try:
        for name, net in nets.items():
            if name in parts:
                net.load_state_dict(from_reference(net, parts[name], name, arch, clip_desc))
                payload[name] = net.state_dict()
        for opt, owners in (("optG", ("netG",)), ("optD", ("netD", "netC"))):
            if opt in parts and all(n in payload for n in owners):
                order = ParamOrder.of({n: nets[n] for n in owners})
                payload[opt] = remap_optimizer(parts[opt], order.reference, order.ours, order.to_ours, order.shapes, PARTS[opt][1])
    except ReferenceFormatError as exc:
        raise ReferenceFormatError(f"{path}: {exc}") from None
    if "netD" not in payload:
        notes.append("generation-only: the file has no netD/netC; `galip train --resume` starts D and C (and their optimizer) fresh")
    for opt in ("optG", "optD"):
        if opt not in payload and (opt == "optG" or "netD" in payload):
            notes.append(f"no {PARTS[opt][1]} in the file: fine-tuning starts that Adam state fresh")
    if differences := recipe_differences(cfg, clip):
        notes.append("differs from the reference recipe the released weights were trained with: " + ", ".join(differences))
    imported = [n for n in PARTS if n in payload]
    payload["origin"] = {
        "format": FORMAT_NAME,
        "file": path.name,
        "sha256": _sha256(path),
        "epoch": epoch if isinstance(epoch, (int, float)) else None,
        "parts": imported,
    }
    save_checkpoint(target, payload)
    return {"checkpoint": str(target), "parts": imported, "origin": payload["origin"], "notes": notes}


def export_reference(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write one of our checkpoints in the reference format, the embedded CLIP tower included.

    Keys carry ``module.``: the reference strips it when loading single-process or for testing and
    needs it when resuming under DDP, so the prefixed file loads on every path.
    """
    out = Path(out)
    if out.exists():
        raise OutputExistsError(f"{out} exists; remove it or pass another path")
    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"])
    clip = training_clip(cfg)
    nets = dict(zip(("netG", "netD", "netC"), build_nets(cfg.model, clip)))
    model: dict[str, Any] = {}
    for name, net in nets.items():
        if name in ckpt:
            net.load_state_dict(ckpt[name])
            model[name] = OrderedDict((DDP_PREFIX + k, v) for k, v in to_reference(net).items())
    state: dict[str, Any] = {"model": model}
    if "netD" in model and "netC" in model and "optG" in ckpt and "optD" in ckpt:
        state["optimizers"] = {}
        for opt, owners in (("optG", ("netG",)), ("optD", ("netD", "netC"))):
            order = ParamOrder.of({n: nets[n] for n in owners})
            state["optimizers"][PARTS[opt][1]] = remap_optimizer(ckpt[opt], order.ours, order.reference, order.to_reference(), order.shapes, opt)
    # The reference resumes from the epoch in the file name and never reads this; ours counts steps.
    state["epoch"] = int((ckpt.get("origin") or {}).get("epoch") or 0)
    atomic_save(state, out)
    differences = recipe_differences(cfg, clip)
    notes = ["the reference code cannot run it (it hard-codes its recipe): " + ", ".join(differences)] if differences else []
    if "netG_ema" in ckpt:
        notes.append("netG holds the trained weights (they match the optimizer state); the EMA generator that "
                     "galip generate/evaluate/serve use has no place in the reference format and is not exported")
    if "optimizers" not in state:
        notes.append("no optimizers: the reference's test.py/sample.ipynb load it, its train.py resume (load_models_opt) does not")
    return {"out": str(out), "parts": list(model) + list(state.get("optimizers", {})), "step": ckpt["step"], "notes": notes}

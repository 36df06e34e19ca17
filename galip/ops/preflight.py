"""Prerequisites of a training run, checked before any work so a run fails fast and says what is missing.

Used by the Prefect flow's first task: ``prefect deployment run galip-train/cc12m`` on a machine without
GPUs, CLIP weights or the CC12M list must fail in seconds with this list, not hours later (or never).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import Config, reference_spec


def _gpu_problem(cfg: Config) -> str | None:
    if not cfg.flow.require_gpu:
        return None
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have >= cfg.flow.nproc_per_node:
        return None
    return (
        f"GPUs: flow.nproc_per_node={cfg.flow.nproc_per_node} needs that many CUDA devices, this machine has {have} "
        "(run on the GPU work pool, or use the demo profile on CPU)"
    )


def _cached_hub_file(name: str, tag: str) -> bool:
    """Whether open_clip's weights for name/tag are in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import get_pretrained_cfg

    pcfg = get_pretrained_cfg(name, tag)
    hub_id = pcfg.get("hf_hub", "")
    if not hub_id:
        return False
    parts = hub_id.strip("/").split("/")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])  # "org/repo[/subfolder]"
    for fname in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        found = try_to_load_from_cache(repo_id, f"{sub}/{fname}" if sub else fname)
        if isinstance(found, str) and os.path.isfile(found):
            return True
    return False


def _clip_problem(cfg: Config) -> str | None:
    weights = cfg.model.clip_pretrained
    if not weights:
        return None
    if os.path.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if Path(weights).is_file() or (cfg.clip_pretrain.enabled and weights == cfg.clip_pretrain.out_path):
            return None  # present, or produced by this run's clip stage
        return f"CLIP weights: model.clip_pretrained={weights!r} does not exist (copy the checkpoint there)"
    if _cached_hub_file(cfg.model.clip_model, weights):
        return None
    return (
        f"CLIP weights: {cfg.model.clip_model}/{weights} are not in the local open_clip/Hugging Face cache "
        f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); bake them into the image "
        "(infra/docker/Dockerfile) or set model.clip_pretrained to a local file"
    )


def _data_problem(cfg: Config) -> str | None:
    d = cfg.data
    if d.demo_images or d.shards or d.url_list.startswith(("s3://", "http://", "https://")):
        return None  # generated here, or given as remote shards / a remote list
    if Path(d.url_list).is_file():
        return None
    if any(Path(d.shards_dir).glob("*.tar")):
        return None
    return (
        f"data: data.url_list={d.url_list!r} does not exist and data.shards_dir={d.shards_dir!r} holds no shards "
        "(obtain cc12m.tsv: url<TAB>caption, no header; or set data.shards to existing shards)"
    )


def _reference_problem(cfg: Config) -> str | None:
    """FID/FD statistics need local reference shards: with the training shards on S3 that is eval.ref_shards."""
    spec, key = reference_spec(cfg)
    if "://" not in spec or not ({"fid", "fd_clip"} & set(cfg.eval.metrics)):
        return None
    return (
        f"evaluation: {key}={spec!r} is remote and reference statistics need local shards: set eval.ref_shards to a "
        "local folder of the reference set (zero-shot FID: COCO val as webdataset shards; or `galip verify-data --to DIR`)"
    )


def missing_prerequisites(cfg: Config) -> list[str]:
    """Every missing prerequisite, as lines that say what to do; empty when the run can start."""
    return [p for p in (_gpu_problem(cfg), _data_problem(cfg), _clip_problem(cfg), _reference_problem(cfg)) if p]

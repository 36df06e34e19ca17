"""The pipeline's stages and the one command line of each.

download -> clip -> train -> evaluate -> register. dvc.yaml's stages run these command lines
(templated from params.yaml), the Prefect flow runs them directly or through ``dvc repro``, and a user
can type them: tests/test_dvc_repro.py checks that dvc.yaml renders to exactly these.
"""

from __future__ import annotations

from .config import Config

STAGES = ("download", "clip", "train", "evaluate", "register")


def pipeline_config(cfg: Config) -> Config:
    """What the stages after ``clip`` run with: the CLIP weights the clip stage wrote (their command lines
    say so with ``-S model.clip_pretrained=<clip_pretrain.out_path>``)."""
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"clip_pretrained": cfg.clip_pretrain.out_path})})


def stage_command(stage: str, cfg: Config, select: list[str] | None = None) -> list[str]:
    """The command line of ``stage``. ``select``: how the command finds its config (``--profile P``,
    ``--params F``, ``-S key=value``...); none = params.yaml, as under `dvc repro`."""
    select = list(select or [])
    clip = ["-S", f"model.clip_pretrained={cfg.clip_pretrain.out_path}"]
    torchrun = ["torchrun", "--standalone", f"--nproc_per_node={cfg.flow.nproc_per_node}", "-m", "galip"]
    commands = {
        "download": ["galip", "download", *select],
        "clip": ["galip", "train-clip", *select],
        "train": [*torchrun, "train", *select, *clip, "--resume"],
        "evaluate": [*torchrun, "evaluate", *select, *clip],
        "register": ["galip", "register", *select, *clip],
    }
    return commands[stage]

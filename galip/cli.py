"""The ``galip`` command line. Each command parses params.yaml (+ overrides) and calls a ``run`` function."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from .config import Config, load_config
from .errors import UserError
from .ops.redact import RedactFilter, redact_every_log_record


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (in-process callers may swap it between commands)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class GalipGroup(TyperGroup):
    """Every command, whether started as ``galip`` or ``python -m galip``: warnings as one line each with
    credentials redacted, and a UserError as one ``error:`` line with exit code 2 instead of a traceback.
    This is the one place user mistakes are caught: every error a user can fix is a UserError subclass
    (galip.errors), so no command keeps its own list of exception types."""

    def invoke(self, ctx):
        redact_every_log_record()
        if not logging.getLogger().handlers:
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
            handler.addFilter(RedactFilter())
            # Warnings only, also when a library lowers the root level later (open_clip_train sets INFO).
            handler.setLevel(logging.WARNING)
            logging.basicConfig(level=logging.WARNING, handlers=[handler])
        with _recorded_config_reads(ctx):
            try:
                return super().invoke(ctx)
            except UserError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None


# Tests set it to a file: each command appends the config keys it read (galip.config.recording_reads).
RECORD_READS_ENV = "GALIP_RECORD_CONFIG_READS"


@contextlib.contextmanager
def _recorded_config_reads(ctx):
    target = os.environ.get(RECORD_READS_ENV)
    if not target:
        yield
        return
    from .config import recording_reads

    with recording_reads() as reads:
        try:
            yield
        finally:
            line = {"command": ctx.invoked_subcommand or "", "rank": os.environ.get("RANK", "0"), "reads": sorted(reads)}
            with open(target, "a") as fh:
                fh.write(json.dumps(line) + "\n")


app = typer.Typer(
    cls=GalipGroup,
    help="GALIP text-to-image GAN pipeline: download data, train, evaluate, generate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read")]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", help="profile from params.yaml (default: its `profile` key)")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("-S", "--set", help="override a parameter, DVC syntax: -S train.lr_g=2e-4 (repeatable)"),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print the resolved configuration and exit")]


def load_or_exit(params: Path, profile: str | None, overrides: list[str] | None, dry_run: bool = False) -> Config:
    """Resolve the configuration; invalid input stops here (a ConfigError), before any work, naming the key."""
    cfg = load_config(params, overrides or [], profile)
    if dry_run:
        typer.echo(cfg.to_yaml())
        raise typer.Exit(0)
    return cfg


@app.command()
def config(
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the resolved configuration (YAML)."""
    load_or_exit(params, profile, set_, dry_run=True)


@app.command()
def profile(
    name: Annotated[Optional[str], typer.Argument(help="preset in profiles/ to write to params.yaml (demo, cc12m)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    diff: Annotated[bool, typer.Option("--diff", help="list the keys where params.yaml differs from its preset; exit 1 if any")] = False,
) -> None:
    """Write a profile's values to params.yaml (what every stage and `dvc repro` read), or --diff it."""
    from .config import preset_names, profile_diff, write_profile

    if diff or name is None:
        current, changes = profile_diff(params)
        typer.echo(f"{params}: profile {current}, {len(changes)} value(s) differ from profiles/{current}.yaml")
        for line in changes:
            typer.echo(f"  {line}")
        raise typer.Exit(1 if diff and changes else 0)
    cfg = write_profile(name, params, set_ or [])
    typer.echo(f"{params}: profile {cfg.profile} (presets: {', '.join(preset_names(params))})")


@app.command()
def summary(
    clip: Annotated[Optional[str], typer.Option("--clip", help="open_clip model name")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="generator output size")] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: Annotated[str, typer.Option("--profile")] = "cc12m",
    set_: SetOpt = None,
) -> None:
    """Print learnable parameter counts of NetG/NetD/NetC and the frozen CLIP as one JSON object.

    CLIP weights are random here (nothing is downloaded); counts do not depend on them.
    """
    from .model.summary import summarize

    overrides = list(set_ or []) + ["model.clip_pretrained="]
    if clip:
        overrides.append(f"model.clip_model={clip}")
        # Block indices in params.yaml are for the profile's CLIP; a different CLIP derives its own.
        overrides += ["model.feature_blocks=[]", "model.prompt_blocks=[]"]
    if image_size:
        overrides.append(f"model.image_size={image_size}")
    cfg = load_or_exit(params, profile, overrides)
    typer.echo(json.dumps(summarize(cfg.model)))


@app.command()
def train(
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the latest checkpoint in train.out_dir")] = False,
    allow_config_change: Annotated[
        bool,
        typer.Option(
            "--allow-config-change",
            help="resume although model.* or the optimiser/loss settings (learning rates, betas, batch size...) differ from the checkpoint's",
        ),
    ] = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Train GALIP (single process, or under torchrun: `torchrun --nproc_per_node=N -m galip train`)."""
    cfg = load_or_exit(params, profile, set_, dry_run)
    from .ops.pipeline_run import stage_run
    from .train.trainer import run

    with stage_run(cfg, "train"):
        result = run(cfg, resume=resume, allow_config_change=allow_config_change)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(json.dumps(result))


@app.command("demo-data")
def demo_data(
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Generate the demo scenes and their URL list (data.url_list's folder) if missing; deterministic."""
    cfg = load_or_exit(params, profile, set_, dry_run)
    from .data.download import ensure_demo_source

    typer.echo(str(ensure_demo_source(cfg.data)))


@app.command()
def download(
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Download data.url_list into webdataset shards (img2dataset); write the data report and shard manifest."""
    cfg = load_or_exit(params, profile, set_, dry_run)
    from .data.download import run
    from .ops.pipeline_run import stage_run

    with stage_run(cfg, "download"):
        report = run(cfg)
    typer.echo(json.dumps({k: report[k] for k in ("successes", "failed", "shards", "manifest", "manifest_hash")}))


@app.command("verify-data")
def verify_data(
    manifest: Annotated[Optional[Path], typer.Option("--manifest", help="shard manifest (default: data.manifest)")] = None,
    copy_to: Annotated[Optional[Path], typer.Option("--to", help="also keep a local copy of every shard in this folder")] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fetch every shard a manifest lists (folder or s3://) and check its sha256 and size; exit 2 on any mismatch."""
    cfg = load_or_exit(params, profile, set_)
    from .data.download import verify_manifest

    path = manifest or Path(cfg.data.manifest)
    if not path.is_file():
        typer.echo(f"error: {path}: no manifest (run `galip download`, or `dvc checkout {path}` / `dvc pull {path}`)", err=True)
        raise typer.Exit(2)
    result = verify_manifest(path, cfg.data.s3_endpoint_url, copy_to)
    typer.echo(json.dumps(result))
    if result["mismatches"]:
        typer.echo(f"error: {len(result['mismatches'])} of {result['shards']} shards do not match {path}: {result['mismatches'][0]}", err=True)
        raise typer.Exit(2)


@app.command()
def trace(
    version: Annotated[str, typer.Argument(help="model version number (or an alias such as champion)")],
    model: Annotated[Optional[str], typer.Option("--model", help="registered model (default: mlflow.model_name)")] = None,
    manifest: Annotated[Path, typer.Option("--manifest", help="where to write the version's shard manifest")] = Path("trace/manifest.json"),
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
) -> None:
    """From a model version back to its run, git commit, config and data version; then `galip verify-data --manifest ...`."""
    cfg = load_or_exit(params, profile, set_)
    from .ops.pipeline_run import client_for, trace as run

    name = model or cfg.mlflow.model_name
    if not version.isdigit():
        version = str(client_for(cfg).get_model_version_by_alias(name, version).version)
    typer.echo(json.dumps(run(cfg, name, version, manifest), indent=2))


@app.command()
def generate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="training checkpoint (.pt)")],
    prompt: Annotated[list[str], typer.Option("--prompt", help="text prompt (repeatable: one grid row each)")],
    n: Annotated[int, typer.Option("--n", help="images per prompt")] = 8,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Path, typer.Option("--out", help="PNG grid to write")] = Path("grid.png"),
    interpolate: Annotated[bool, typer.Option("--interpolate", help="walk the latent from --seed to --seed+1")] = False,
    device: Annotated[str, typer.Option("--device")] = "auto",
    max_images: Annotated[int, typer.Option("--max-images", help="refuse grids of more images than this (memory)")] = 1024,
) -> None:
    """Write a PNG grid of generated images, one row per prompt."""
    from .eval.generate import run

    typer.echo(str(run(checkpoint, prompt, n=n, seed=seed, out=out, interpolate=interpolate, device=device, max_images=max_images)))


@app.command()
def evaluate(
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    checkpoint: Annotated[
        Optional[Path], typer.Option("--checkpoint", help="checkpoint to score (default: the latest in train.out_dir/checkpoints)")
    ] = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Score a checkpoint with eval.metrics; writes eval.out_dir/metrics.json and samples.png (torchrun-aware)."""
    cfg = load_or_exit(params, profile, set_, dry_run)
    from .eval.evaluate import run
    from .ops.pipeline_run import stage_run

    with stage_run(cfg, "evaluate"):
        result = run(cfg, checkpoint)
    typer.echo(json.dumps(result))


@app.command("train-clip")
def train_clip(
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Train model.clip_model on the shards with open_clip_train; writes clip_pretrain.out_path (demo)."""
    cfg = load_or_exit(params, profile, set_, dry_run)
    from .ops.pipeline_run import stage_run
    from .train.clip_pretrain import run

    with stage_run(cfg, "clip"):
        result = run(cfg)
    typer.echo(json.dumps(result))


@app.command("import-reference")
def import_reference(
    path: Annotated[Path, typer.Argument(help="checkpoint of the reference code (tobran/GALIP), e.g. the released CC12M model")],
    out: Annotated[
        Optional[Path], typer.Option("--out", help="checkpoint to write (default: train.out_dir/checkpoints/ckpt_00000000.pt, where --resume finds it)")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: Annotated[str, typer.Option("--profile", help="profile whose model and CLIP the file must match")] = "cc12m",
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Convert a reference GALIP checkpoint into ours (generate, evaluate, register, fine-tune with --resume)."""
    cfg = load_or_exit(params, profile, set_, dry_run)
    from .train.reference_format import import_reference as run

    _convert(lambda: run(cfg, path, out))


@app.command("export-reference")
def export_reference(
    checkpoint: Annotated[Path, typer.Argument(help="our checkpoint (.pt)")],
    out: Annotated[Path, typer.Argument(help="file to write in the reference format (e.g. state_epoch_000.pth)")],
) -> None:
    """Write a checkpoint in the reference code's format, with the CLIP weights its NetG embeds."""
    from .train.reference_format import export_reference as run

    _convert(lambda: run(checkpoint, out))


def _convert(call) -> None:
    """A checkpoint conversion: notes on stderr, result JSON on stdout."""
    result = call()
    for note in result["notes"]:
        typer.echo(f"note: {note}", err=True)
    typer.echo(json.dumps(result))


@app.command()
def register(
    metrics: Annotated[
        Optional[Path], typer.Option("--metrics", help="metrics.json of `galip evaluate` (default: eval.out_dir/metrics.json; without one: no gate metric, champion unchanged)")
    ] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="checkpoint (default: the one metrics.json names)")] = None,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="MLflow run to log the model to (default: the pipeline's run)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Log the generator as an MLflow pyfunc, register it (alias challenger) and apply the champion gate;
    the result goes to eval.out_dir/registered.json."""
    cfg = load_or_exit(params, profile, set_, dry_run)
    from .eval.evaluate import write_json_atomic
    from .ops.pipeline_run import stage_run
    from .ops.registry import register_from_files

    default = Path(cfg.eval.out_dir) / "metrics.json"
    metrics = metrics or (default if default.is_file() else None)
    if run_id:
        os.environ["MLFLOW_RUN_ID"] = run_id
    with stage_run(cfg, "register") as pipeline_run_id:
        result = register_from_files(cfg, metrics, checkpoint, pipeline_run_id)
    write_json_atomic(Path(cfg.eval.out_dir) / "registered.json", result)
    typer.echo(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process (tests and ``python -m galip`` call it); returns the exit code.

    Standalone mode, as in the ``galip`` console script: usage errors print click's short usage
    message (never a traceback) and every outcome ends in SystemExit, turned into the return value.
    """
    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name="galip", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Print where to look after `make demo`: both UIs (run pages), model version, gate, sample grids, metrics.

    python scripts/demo_summary.py PREFECT_UI_URL MLFLOW_UI_URL kept|running|stopped|ui
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


# What is still serving the addresses below after the demo exits.
WHERE = {
    "kept": "KEEP=1: both UIs run on; `make stop` stops them",
    "running": "the Prefect server was running before and runs on; `make ui` also serves the MLflow UI, `make stop` stops both",
    "stopped": "the UIs stopped with the demo: `make ui` serves both again at these addresses, `make stop` stops them",
    "ui": "`make ui`: both UIs and the local worker run until `make stop`",
}
# Prefect marks a deployment Ready while a worker polls its pool; the demo's worker may be gone. A run that no
# worker takes is failed by the pool's guard (flows/deploy_local.py no_worker_guard), named for the fix.
READY = (
    "  deployments     Ready while the local worker polls pool galip-local (`make ui` and `make demo` start it);\n"
    "                  Not Ready = no worker: a run then goes Late and, half a minute later, fails in state\n"
    "                  'No worker on galip-local: run make ui'"
)


# MLflow 3.17's UI has no server-side default for its GenAI / Model training switch: the page's
# `workflowType` query, else the browser's choice (localStorage), else GenAI; the experiment tag is not read.
MLFLOW_MODE = (
    "                  (opens as Model training; the bare address opens GenAI pages until you click\n"
    "                  'Model training' at the top of MLflow's sidebar once: the browser keeps that choice)"
)


def main(argv: list[str]) -> int:
    from mlflow import MlflowClient

    from flows.galip_train import GalipTrainParams, Links, absolute_tracking_uri
    from galip.ops.tracking import UI_WORKFLOW_QUERY

    if len(argv) != 3 or argv[2] not in WHERE:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    prefect_ui, mlflow_ui, state = argv[0].rstrip("/"), argv[1].rstrip("/"), argv[2]
    cfg = GalipTrainParams(profile="demo").config()
    uri = absolute_tracking_uri(cfg)
    metrics_path = Path(cfg.eval.out_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1) if experiment else []
    name = cfg.mlflow.model_name
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    latest = versions[-1] if versions else None
    # search results leave aliases out: ask for each alias this project uses
    aliases = {}
    for alias in (cfg.mlflow.champion_alias, cfg.mlflow.challenger_alias):
        try:
            aliases[alias] = client.get_model_version_by_alias(name, alias).version
        except Exception:  # noqa: BLE001 - alias not set
            pass
    lines = ["", f"Where to look ({WHERE[state]})", f"  Prefect UI      {prefect_ui}"]
    run = runs[0] if runs else None
    if run is not None and run.data.tags.get("prefect.flow_run_url"):
        lines.append(f"    flow run      {run.data.tags['prefect.flow_run_url']}")
    lines += [f"  Prefect CLI     export PREFECT_API_URL={prefect_ui}/api   (then e.g. prefect deployment run galip-train/cc12m)", READY]
    if run is not None:
        links = Links(mlflow_ui=mlflow_ui, experiment_id=run.info.experiment_id, run_id=run.info.run_id)
        lines += [f"  MLflow UI       {links.experiment_url}", MLFLOW_MODE, f"    run           {links.run_url}"]
        if latest:
            tagged = ", ".join(f"{a}=v{v}" for a, v in sorted(aliases.items()))
            lines.append(f"    model         {links.model_version_url(name, latest.version)}  ({name} v{latest.version}; {tagged})")
            lines.append(f"  gate            {latest.tags.get('gate_decision', '')}")
    else:
        lines += [f"  MLflow UI       {mlflow_ui}/#/experiments?{UI_WORKFLOW_QUERY}", MLFLOW_MODE]
    lines += [
        f"  sample grid     {(Path(cfg.eval.out_dir) / 'samples.png').resolve()}",
        f"  training grids  {(Path(cfg.train.out_dir) / 'samples').resolve()}/",
        f"  metrics         {metrics_path.resolve()}",
    ]
    shown = ("prompt_fidelity", "prompt_fidelity_held_in_attr_mean", "prompt_fidelity_held_out_all_attrs", "r_precision",
             "clip_score_eval", "clip_score_train", "fd_clip")  # fmt: skip
    for key in shown:
        if key in metrics:
            lines.append(f"    {key:34s} {metrics[key]:.4g}")
    if cfg.mlflow.champion_alias in aliases:
        serve = f"MLFLOW_TRACKING_URI={uri} mlflow models serve -m models:/{name}@{cfg.mlflow.champion_alias} --env-manager local -h 127.0.0.1 -p 5001"
        lines.append(f"  serve it        {serve}")
    from galip.ops.redact import redact

    print(redact("\n".join(lines)))  # a tracking URI from the environment may hold a password
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Print where to look after `make demo`: Prefect UI, MLflow UI command, sample grid, model version and aliases."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from mlflow import MlflowClient

    from flows.galip_train import GalipTrainParams, absolute_tracking_uri

    api_url = argv[0] if argv else os.environ.get("PREFECT_API_URL", "")
    cfg = GalipTrainParams(profile="demo").config()
    uri = absolute_tracking_uri(cfg)
    metrics_path = Path(cfg.eval.out_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    client = MlflowClient(uri)
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
    lines = [
        "",
        "Where to look",
        f"  Prefect UI      {api_url.removesuffix('/api')}   (make ui keeps it running; make stop stops it)",
        f"  MLflow UI       mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000",
        f"  sample grid     {(Path(cfg.eval.out_dir) / 'samples.png').resolve()}",
        f"  training grids  {(Path(cfg.train.out_dir) / 'samples').resolve()}/",
        f"  metrics         {metrics_path.resolve()}",
    ]
    for key in ("prompt_fidelity", "r_precision", "clip_score_eval", "clip_score_train", "fd_clip"):
        if key in metrics:
            lines.append(f"    {key:16s} {metrics[key]:.4f}")
    chance = metrics.get("protocol", {}).get("metrics", {}).get("prompt_fidelity", {})
    if chance:
        lines.append(f"    prompt_fidelity protocol: {json.dumps(chance)[:300]}")
    if latest:
        tagged = ", ".join(f"{a}=v{v}" for a, v in sorted(aliases.items()))
        lines.append(f"  model           {name} v{latest.version} (aliases: {tagged})")
        lines.append(f"  gate            {latest.tags.get('gate_decision', '')}")
        lines.append(f"  serve it        MLFLOW_TRACKING_URI={uri} mlflow models serve -m models:/{name}@{cfg.mlflow.champion_alias} --env-manager local -h 127.0.0.1 -p 5001")
    from galip.redact import redact

    print(redact("\n".join(lines)))  # a tracking URI from the environment may hold a password
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

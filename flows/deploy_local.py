"""Deploy galip-train/cc12m on the local process pool, for machines without the Kubernetes pool.

prefect.yaml puts cc12m on the GPU pool `galip-k8s` and in the image's /app; here no worker serves that
pool, so a run would wait forever. Deployed on the local pool instead (same entrypoint and parameters,
read from prefect.yaml), a run starts and its preflight task fails in seconds naming what is missing
(GPUs, CLIP weights, the CC12M list).

    python -m flows.deploy_local galip-local
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml


def main(argv: list[str] | None = None) -> int:
    from flows.galip_train import galip_train

    args = sys.argv[1:] if argv is None else argv
    pool = args[0] if args else "galip-local"
    root = Path.cwd()
    spec = {d["name"]: d for d in yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]}["cc12m"]
    deployment_id = galip_train.from_source(source=str(root), entrypoint=spec["entrypoint"]).deploy(
        name="cc12m",
        work_pool_name=pool,
        parameters=spec["parameters"],
        description=f"{spec['description']} [local stand-in on {pool}: fails fast in preflight here]",
        tags=spec.get("tags", []),
        print_next_steps=False,
    )
    print(f"deployed galip-train/cc12m on {pool} ({deployment_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

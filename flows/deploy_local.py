"""Deploy galip-train/cc12m on the local process pool, for machines without the Kubernetes pool.

prefect.yaml puts cc12m on the GPU pool `galip-k8s` and in the image's /app; here no worker serves that
pool, so a run would wait forever. Deployed on the local pool instead (same entrypoint and parameters,
read from prefect.yaml), a run starts and its preflight task fails in seconds naming what is missing
(GPUs, CLIP weights, the CC12M list).

It also installs the pool's no-worker guard (`no_worker_guard`): a run on the pool that no worker takes
ends Failed, named for that, instead of staying Late forever.

    python -m flows.deploy_local galip-local
"""

from __future__ import annotations

import sys
from datetime import timedelta
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
    no_worker_guard(pool)
    print(f"guard: a run on {pool} that no worker takes fails after {NO_WORKER_AFTER_LATE_S} s of Late")
    return 0


NO_WORKER_AFTER_LATE_S = 15  # Prefect's minimum for a proactive trigger is 10 s


def no_worker_guard(pool: str) -> None:
    """A Prefect automation: a flow run on `pool` that is Late (not started 15 s after its time) and that no
    worker takes in the next NO_WORKER_AFTER_LATE_S seconds is set Failed, named for the cause. Its state
    name is what `prefect deployment run --watch` prints as its last line, so a user who stopped the worker
    reads the fix in the terminal instead of watching a run wait forever. A worker that comes late (busy
    machine) still takes the run: the guard fires only when no Pending follows the Late."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    name = f"galip: fail runs no worker takes on {pool}"
    automation = AutomationCore(
        name=name,
        description=f"Runs on {pool} fail instead of waiting forever when no worker polls {pool} (flows/deploy_local.py).",
        trigger=EventTrigger(
            posture=Posture.Proactive,
            after={"prefect.flow-run.Late"},
            expect={"prefect.flow-run.Pending", "prefect.flow-run.Running", "prefect.flow-run.Cancelling", "prefect.flow-run.Cancelled"},
            for_each={"prefect.resource.id"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "work-pool", "prefect.resource.name": pool},
            threshold=1,
            within=timedelta(seconds=NO_WORKER_AFTER_LATE_S),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.FAILED,
            name=f"No worker on {pool}: run make ui",
            message=(f"No worker took this run: no worker polls the work pool {pool!r} (or the pool is paused). "
                     "`make ui` starts the local worker (with the Prefect server and the MLflow UI); then run the deployment again."),
        )],
    )  # fmt: skip
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(name):  # deploying again replaces it
            client.delete_automation(old.id)
        client.create_automation(automation)


if __name__ == "__main__":
    sys.exit(main())

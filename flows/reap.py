"""End the records of runs whose processes are gone: flow runs of the local pool and their MLflow runs.

A flow run whose process was killed together with its worker and server (kill -9, a closed laptop)
cannot report its own end, so Prefect would show it Running and MLflow its run RUNNING forever.
scripts/prefect-local.sh calls this whenever the server is up and no worker runs, i.e. when no flow
run of the local pool can be alive except as a process that still exists on this machine:

    python -m flows.reap galip-local
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from uuid import UUID

MESSAGE = "its process ended without reporting (worker or machine stopped); marked crashed by flows.reap"
# Prefect's final state of a flow run -> the MLflow run status that says the same.
MLFLOW_STATUS = {"COMPLETED": "FINISHED", "FAILED": "FAILED", "CRASHED": "KILLED", "CANCELLED": "KILLED"}


def _process_alive(infrastructure_pid: str | None) -> bool:
    """The process worker records ``host:pid``; a process on another host is not ours to judge."""
    if not infrastructure_pid:
        return False
    host, _, pid = infrastructure_pid.rpartition(":")
    if host and host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


async def crash_lost_flow_runs(pool: str) -> list[str]:
    """Mark the pool's Pending/Running/Cancelling flow runs whose process is gone as Crashed; returns their ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    active = FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING])
    crashed = []
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=active)),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        )
        for run in runs:
            if _process_alive(run.infrastructure_pid):
                continue
            await client.set_flow_run_state(run.id, Crashed(message=MESSAGE), force=True)
            crashed.append(str(run.id))
    return crashed


async def _final_state(flow_run_id: str) -> str | None:
    """The flow run's final state type, None while it is still active (or unknown to this server)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            run = await client.read_flow_run(UUID(flow_run_id))
        except (ObjectNotFound, ValueError):
            return None
    state = run.state
    return state.type.value if state is not None and state.is_final() else None


def end_orphaned_mlflow_runs(tracking_uri: str, experiment: str) -> list[str]:
    """MLflow runs still RUNNING whose Prefect flow run has ended get that end as their status."""
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return []  # no store yet, so no runs (and no reason to create one here)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    ended = []
    for run in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'"):
        flow_run_id = run.data.tags.get("prefect.flow_run_id")
        final = asyncio.run(_final_state(flow_run_id)) if flow_run_id else None
        if final in MLFLOW_STATUS:
            client.set_terminated(run.info.run_id, status=MLFLOW_STATUS[final])
            ended.append(run.info.run_id)
    return ended


def main(argv: list[str] | None = None) -> int:
    from flows.galip_train import GalipTrainParams, absolute_tracking_uri

    args = sys.argv[1:] if argv is None else argv
    pool = args[0] if args else "galip-local"
    crashed = asyncio.run(crash_lost_flow_runs(pool))
    cfg = GalipTrainParams().config()
    ended = end_orphaned_mlflow_runs(absolute_tracking_uri(cfg), cfg.mlflow.experiment)
    print(f"flow runs marked crashed: {crashed or 'none'}; MLflow runs ended: {ended or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

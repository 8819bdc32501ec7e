"""Runs left "running" by a killed process, found and marked failed by the next run.

A pipeline killed with SIGKILL (out of memory, a preempted machine, `kill -9`) never tells
MLflow or ZenML that it stopped, so both show it running for ever: on a shared server, a
dashboard full of ghosts. Each run records which process runs it (host, boot, pid and the
pid's start time, so a reused pid or a reboot is not taken for the same process); the next
run of the pipeline on that host marks every run whose process is gone as failed.
A run from another host is left alone: from here nobody can tell whether it still runs.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

import mlflow

logger = logging.getLogger(__name__)

TAG = "dalle2.process"  # MLflow run tag and ZenML run metadata key


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None if there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22; the name before it may hold spaces


def this_process() -> str:
    """`host:boot:pid:start`, unique to this process for as long as the host runs."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{_boot_id()}:{pid}:{_start_ticks(pid) or '?'}"


def is_gone(process: str) -> bool:
    """True when `process` (from this_process) ran on this host and no longer runs."""
    host, boot, pid, start = [*process.rsplit(":", 3), "", "", ""][:4]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's run: it may well be running
    return boot != _boot_id() or _start_ticks(int(pid)) != start


def reap_mlflow(experiment_id: str, current_run_id: str) -> list[str]:
    """Mark this host's RUNNING MLflow runs whose process is gone as KILLED; their ids."""
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    reaped = []
    for run in runs:
        process = run.data.tags.get(TAG)
        if run.info.run_id != current_run_id and process and is_gone(process):
            client.set_terminated(run.info.run_id, status="KILLED")
            reaped.append(run.info.run_id)
    return reaped


def reap_zenml(pipeline_name: str, current_run_id: object) -> list[str]:
    """Mark this host's running ZenML runs of the pipeline (and their running steps) whose
    process is gone as failed; their names."""
    from zenml.client import Client
    from zenml.enums import ExecutionStatus
    from zenml.models import PipelineRunUpdate, StepRunUpdate

    client = Client()
    store = client.zen_store
    now = datetime.now(UTC)
    reaped = []
    runs = client.list_pipeline_runs(
        pipeline_name=pipeline_name, in_progress=True, size=100, hydrate=True
    )
    for run in runs.items:
        process = str(run.run_metadata.get(TAG) or "")
        if run.id == current_run_id or not process or not is_gone(process):
            continue
        why = f"killed: the process that ran it ({process}) is gone"
        for step in client.list_run_steps(pipeline_run_id=run.id, size=100).items:
            if not step.status.is_finished:
                store.update_run_step(
                    step.id, StepRunUpdate(status=ExecutionStatus.FAILED, end_time=now)
                )
        update = PipelineRunUpdate(status=ExecutionStatus.FAILED, status_reason=why, end_time=now)
        store.update_run(run.id, update)
        reaped.append(run.name)
    return reaped


def record_and_reap() -> None:
    """In a pipeline's first step: tag its runs with this process, then mark the ghosts of
    earlier runs failed and say so in the log. Outside a ZenML step it does nothing."""
    from zenml import get_step_context, log_metadata

    try:
        ctx = get_step_context()
    except RuntimeError:
        return
    process = this_process()
    log_metadata(metadata={TAG: process}, run_id_name_or_prefix=ctx.pipeline_run.id)
    reaped = reap_zenml(ctx.pipeline.name, ctx.pipeline_run.id)
    active = mlflow.active_run()
    if active is not None:
        mlflow.set_tag(TAG, process)
        ghosts = reap_mlflow(active.info.experiment_id, active.info.run_id)
        reaped += [f"MLflow run {r}" for r in ghosts]
    if reaped:
        logger.warning(
            "marked %d run(s) left running by a killed process as failed: %s",
            len(reaped),
            ", ".join(reaped),
        )

"""Run a training stage in this process, or data-parallel on N processes through torchrun.

A step hands over the stage's recipe (recipes/stage.py) and plain inputs (the config, data
paths, a stage index). With
`train.num_processes` > 1 they go to a job folder and `torchrun` starts the processes, each
running `python -m dalle2.recipes.launch JOB_DIR`: accelerate wraps the model in DDP (gloo on CPU,
NCCL on GPUs), every process streams its own shards, and rank 0 alone reports metrics (a
JSON-lines file that this process forwards as lines arrive) and writes the trained model,
read back here as a ModelArtifact.

Multi-node: set DALLE2_TORCHRUN_ARGS to torchrun's rendezvous flags (replacing
`--standalone`), DALLE2_JOB_ROOT to a folder every node sees, and start the same worker
command with the same flags on the other nodes (see the README).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from dalle2.config import DataConfig
from dalle2.device import autocast_dtype, pick_device
from dalle2.models import ModelArtifact
from dalle2.recipes.stage import Recipe, StageInputs
from dalle2.training.fit import Run
from dalle2.training.trainer import MetricsCallback, TrainResult

logger = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The data-parallel processes of a stage failed."""


def torchrun_command(num_processes: int, job_dir: Path) -> list[str]:
    """torchrun (as `python -m torch.distributed.run`) running the worker on `job_dir`."""
    rendezvous = shlex.split(os.environ.get("DALLE2_TORCHRUN_ARGS", "")) or ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nproc-per-node={num_processes}",
        "-m",
        "dalle2.recipes.launch",
        str(job_dir),
    ]


def _forward_metrics(path: Path, done: int, callback: MetricsCallback | None) -> int:
    """Hand lines past the first `done` of a metrics file to `callback`; returns lines seen."""
    if not path.is_file():
        return done
    text = path.read_text()
    complete = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    for line in complete[done:]:
        record = json.loads(line)
        if callback is not None:
            callback(int(record["step"]), record["metrics"])
    return len(complete)


def train_stage(
    recipe: Recipe[Any, Any],
    section: BaseModel,
    data: DataConfig,
    inputs: StageInputs,
    *,
    device: torch.device,
    callback: MetricsCallback | None = None,
    progress: bool = True,
) -> tuple[ModelArtifact, TrainResult]:
    """Train one stage on its configured number of processes; returns the packed EMA model."""
    n = section.train.num_processes  # type: ignore[attr-defined]
    if n == 1:
        run = Run(device, None, callback, progress, inputs.checkpoint_dir)
        model, result = recipe.fit(section, data, inputs, run)
        return recipe.pack(model, inputs), result
    root = os.environ.get("DALLE2_JOB_ROOT")
    with tempfile.TemporaryDirectory(prefix=f"dalle2-{recipe.name}-", dir=root) as tmp:
        job = Path(tmp)
        write_job(job, recipe, section, data, inputs, device, progress)
        command = torchrun_command(n, job)
        logger.info("training %s on %d processes: %s", recipe.name, n, shlex.join(command))
        proc = subprocess.Popen(command)
        seen = 0
        try:
            while proc.poll() is None:
                seen = _forward_metrics(job / "metrics.jsonl", seen, callback)
                time.sleep(0.5)
        except BaseException:  # SIGTERM/Ctrl-C here: torchrun passes it on, workers checkpoint
            proc.terminate()
            proc.wait()
            raise
        _forward_metrics(job / "metrics.jsonl", seen, callback)
        if proc.returncode != 0 or not (job / "result.json").is_file():
            raise LaunchError(
                f"training {recipe.name} on {n} processes failed (torchrun exit code "
                f"{proc.returncode}); the processes' own errors are printed above"
            )
        result = TrainResult(**json.loads((job / "result.json").read_text()))
        return ModelArtifact.from_dir(job / "model"), result


def write_job(
    job_dir: Path,
    recipe: Recipe[Any, Any],
    section: BaseModel,
    data: DataConfig,
    inputs: StageInputs,
    device: torch.device,
    progress: bool,
) -> None:
    """The job folder's job.json, all a torchrun worker reads: the recipe's module, its
    config section, the data settings, the inputs, the device."""
    spec = {
        "recipe": recipe.module,
        "section": section.model_dump(mode="json"),
        "data": data.model_dump(mode="json"),
        "device": device.type,
        "inputs": inputs.to_json(),
        "progress": progress,
    }
    (job_dir / "job.json").write_text(json.dumps(spec))


def _mixed_precision(device: torch.device, precision: str) -> str:
    dtype = autocast_dtype(device, precision)  # type: ignore[arg-type]
    return {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def worker(job_dir: Path) -> None:
    """One torchrun process: train under accelerate; rank 0 reports and writes the model."""
    from accelerate import Accelerator

    spec = json.loads((job_dir / "job.json").read_text())
    recipe: Recipe[Any, Any] = importlib.import_module(spec["recipe"]).RECIPE
    inputs = StageInputs.from_json(spec["inputs"])
    section = recipe.config.model_validate(spec["section"])
    data = DataConfig.model_validate(spec["data"])
    device = pick_device(spec["device"])
    acc = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=_mixed_precision(device, section.train.precision),
    )
    callback = None
    if acc.is_main_process:
        metrics_file = (job_dir / "metrics.jsonl").open("a")

        def callback(step: int, metrics: dict[str, float]) -> None:
            metrics_file.write(json.dumps({"step": step, "metrics": metrics}) + "\n")
            metrics_file.flush()

    run = Run(acc.device, acc, callback, spec["progress"], inputs.checkpoint_dir)
    model, result = recipe.fit(section, data, inputs, run)
    if acc.is_main_process:
        metrics_file.close()
        recipe.pack(model, inputs).to_dir(job_dir / "model")
        (job_dir / "result.json").write_text(json.dumps(dataclasses.asdict(result)))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

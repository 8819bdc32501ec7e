"""Run a training stage in this process, or data-parallel on N processes through torchrun.

A step hands over plain inputs (the config, data paths, a stage index). With
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
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch

from dalle2.config import ClipConfig, DataConfig, DecoderStageConfig, PriorConfig
from dalle2.device import autocast_dtype, pick_device
from dalle2.models import ModelArtifact, pack_clip, pack_prior, pack_stage
from dalle2.training.fit import Run
from dalle2.training.trainer import MetricsCallback, TrainResult

Stage = Literal["clip", "prior", "decoder"]
Section = ClipConfig | PriorConfig | DecoderStageConfig
SECTIONS: dict[str, type[Section]] = {
    "clip": ClipConfig,
    "prior": PriorConfig,
    "decoder": DecoderStageConfig,
}
logger = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The data-parallel processes of a stage failed."""


def _fit(
    stage: Stage, section: Section, data: DataConfig, inputs: dict[str, Any], run: Run
) -> tuple[torch.nn.Module, TrainResult]:
    from dalle2.recipes import clip, decoder, prior

    if stage == "clip":
        return clip.fit_clip(section, data, Path(inputs["shard_dir"]), run)
    if stage == "prior":
        return prior.fit_prior(section, data, Path(inputs["emb_dir"]), run)
    return decoder.fit_decoder_stage(
        section,
        int(inputs["index"]),
        data,
        Path(inputs["shard_dir"]),
        Path(inputs["emb_dir"]),
        run,
    )


def _pack(stage: Stage, model: torch.nn.Module, inputs: dict[str, Any]) -> ModelArtifact:
    model = model.cpu()
    if stage == "clip":
        return pack_clip(model)
    if stage == "prior":
        return pack_prior(model)
    return pack_stage(model, int(inputs["index"]))


def _checkpoint_dir(inputs: dict[str, Any]) -> Path | None:
    return Path(inputs["checkpoint_dir"]) if inputs.get("checkpoint_dir") else None


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
    stage: Stage,
    section: Section,
    data: DataConfig,
    inputs: dict[str, Any],
    *,
    device: torch.device,
    callback: MetricsCallback | None = None,
    progress: bool = True,
) -> tuple[ModelArtifact, TrainResult]:
    """Train one stage on its configured number of processes; returns the packed EMA model.

    `inputs` holds the stage's data paths (shard_dir, emb_dir), the decoder stage's index
    and, to resume and checkpoint, a checkpoint_dir that every process can reach.
    """
    n = section.train.num_processes
    if n == 1:
        run = Run(device, None, callback, progress, _checkpoint_dir(inputs))
        model, result = _fit(stage, section, data, inputs, run)
        return _pack(stage, model, inputs), result
    root = os.environ.get("DALLE2_JOB_ROOT")
    with tempfile.TemporaryDirectory(prefix=f"dalle2-{stage}-", dir=root) as tmp:
        job = Path(tmp)
        spec = {
            "stage": stage,
            "section": section.model_dump(mode="json"),
            "data": data.model_dump(mode="json"),
            "device": device.type,
            "inputs": inputs,
            "progress": progress,
        }
        (job / "job.json").write_text(json.dumps(spec))
        command = torchrun_command(n, job)
        logger.info("training %s on %d processes: %s", stage, n, shlex.join(command))
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
                f"training {stage} on {n} processes failed (torchrun exit code "
                f"{proc.returncode}); the processes' own errors are printed above"
            )
        result = TrainResult(**json.loads((job / "result.json").read_text()))
        return ModelArtifact.from_dir(job / "model"), result


def _mixed_precision(device: torch.device, precision: str) -> str:
    dtype = autocast_dtype(device, precision)  # type: ignore[arg-type]
    return {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def worker(job_dir: Path) -> None:
    """One torchrun process: train under accelerate; rank 0 reports and writes the model."""
    from accelerate import Accelerator

    spec = json.loads((job_dir / "job.json").read_text())
    stage, inputs = spec["stage"], spec["inputs"]
    section = SECTIONS[stage].model_validate(spec["section"])
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

    run = Run(acc.device, acc, callback, spec["progress"], _checkpoint_dir(inputs))
    model, result = _fit(stage, section, data, inputs, run)
    if acc.is_main_process:
        metrics_file.close()
        _pack(stage, model, inputs).to_dir(job_dir / "model")
        (job_dir / "result.json").write_text(json.dumps(dataclasses.asdict(result)))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

"""What every step needs: the validated config, the device, and MLflow logging.

Steps log through the MLflow run that ZenML's MLflow experiment tracker opens for them
(one run per pipeline run). Without a tracker in the stack there is no active run and
nothing is logged, so steps also run bare through `.entrypoint(...)` in tests.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch

from dalle2.config import UnclipConfig, parse_config
from dalle2.device import pick_device
from dalle2.models import ModelArtifact
from dalle2.trainer import MetricsCallback, TrainResult

logger = logging.getLogger("dalle2")


def load(config: dict[str, Any]) -> tuple[UnclipConfig, torch.device]:
    cfg = parse_config(config)
    return cfg, pick_device(cfg.device)


def tracking() -> bool:
    """True when an MLflow run is active (the step runs with the experiment tracker)."""
    return mlflow.active_run() is not None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                out.update(flatten(item, f"{key}.{i}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def log_params(cfg: UnclipConfig) -> None:
    if tracking():
        mlflow.log_params(flatten(json.loads(cfg.model_dump_json())))


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if tracking():
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: dict[str, str]) -> None:
    if tracking():
        mlflow.set_tags(tags)


def metrics_callback(prefix: str) -> MetricsCallback:
    """Training metrics -> MLflow as `{prefix}/loss` etc. at each logged step."""

    def callback(step: int, metrics: dict[str, float]) -> None:
        log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    return callback


def log_model(artifact: ModelArtifact, name: str) -> None:
    """Keep a model's files in the MLflow run under models/{name}."""
    if tracking():
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifacts(str(artifact.to_dir(Path(tmp))), artifact_path=f"models/{name}")


def git_commit(root: Path) -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False
    )
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def log_training(name: str, result: TrainResult, seconds: float) -> None:
    """A trained model's summary; `{name}/steps` records where a clock-capped run stopped,
    so it can be reproduced with `train.steps` pinned to it."""
    log_metrics(
        {
            f"{name}/final_loss": result.final_loss,
            f"{name}/samples_per_s": result.samples_per_s,
            f"{name}/steps": result.steps,
            f"time/train_{name}_s": seconds,
        }
    )

"""What every step needs to start (the validated config and device) and what every training
step does around its recipe: resume, log, keep the model."""

from __future__ import annotations

import dataclasses
import shutil
import time
from typing import Any

import torch
from pydantic import BaseModel
from zenml.config.retry_config import StepRetryConfig

from dalle2.config import DataConfig, UnclipConfig, parse_config
from dalle2.device import pick_device
from dalle2.models import ModelArtifact
from dalle2.recipes.launch import train_stage
from dalle2.recipes.stage import Recipe, StageInputs
from steps._cache import checkpoint_dir, latest_step
from steps._tracking import log_metrics, log_model, logger, metrics_callback


def load(config: dict[str, Any]) -> tuple[UnclipConfig, torch.device]:
    cfg = parse_config(config)
    return cfg, pick_device(cfg.device)


# A failed training step is tried again by ZenML, and resumes from its last checkpoint.
TRAIN_RETRY = StepRetryConfig(max_retries=2, delay=10, backoff=2)


def train(
    name: str,
    recipe: Recipe[Any, Any],
    section: BaseModel,
    data: DataConfig,
    inputs: StageInputs,
    device: str,
    progress: bool,
    **upstream: Any,
) -> ModelArtifact:
    """Train one model as a step: resume its checkpoint if a crashed attempt left one, log
    to MLflow, and drop the checkpoint once the model is kept (ZenML's cache has it then)."""
    ckpt = checkpoint_dir(name, section=section, data=data, device=device, **upstream)
    resumed = latest_step(ckpt)
    if resumed:
        logger.info("%s resumes from step %d (checkpoint %s)", name, resumed, ckpt)
    t0 = time.perf_counter()
    artifact, result = train_stage(
        recipe,
        section,
        data,
        dataclasses.replace(inputs, checkpoint_dir=ckpt),
        device=pick_device(device),
        callback=metrics_callback(name),
        progress=progress,
    )
    log_metrics(
        {
            f"{name}/final_loss": result.final_loss,
            f"{name}/samples_per_s": result.samples_per_s,
            # where a clock-capped run stopped: pin train.steps to it to reproduce the run
            f"{name}/steps": result.final_step,
            f"{name}/resumed_from_step": result.resumed_from,
            f"time/train_{name}_s": time.perf_counter() - t0,
        }
    )
    log_model(artifact, name)
    shutil.rmtree(ckpt, ignore_errors=True)
    return artifact

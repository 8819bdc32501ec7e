"""Step 2: train a small CLIP on the pairs (only when no pretrained CLIP is configured)."""

import math
import time
from typing import Annotated, Any

from zenml import ArtifactConfig, step

from dalle2.data import DatasetRef
from dalle2.launch import train_stage
from dalle2.models import ModelArtifact, pack_clip, unpack_clip
from dalle2.recipes.clip import load_clip_for, retrieval_accuracy
from steps._shared import load, log_metrics, log_model, log_training, metrics_callback


@step(enable_cache=False)
def train_clip(
    config: dict[str, Any], dataset: DatasetRef
) -> Annotated[ModelArtifact, ArtifactConfig(name="clip")]:
    """DALL-E 2's first stage, here from scratch with open_clip's model and loss."""
    cfg, device = load(config)
    t0 = time.perf_counter()
    inputs = {"shard_dir": dataset.path}
    artifact, result = train_stage(
        "clip", cfg, inputs, device=device, callback=metrics_callback("clip"), progress=cfg.progress
    )
    log_training("clip", result, time.perf_counter() - t0)
    acc = retrieval_accuracy(unpack_clip(artifact).to(device), dataset.path, cfg)
    if not math.isnan(acc):
        log_metrics({"clip/retrieval_acc_holdout": acc})
    log_model(artifact, "clip")
    return artifact


@step(enable_cache=False)
def load_pretrained_clip(
    config: dict[str, Any],
) -> Annotated[ModelArtifact, ArtifactConfig(name="clip")]:
    """Reference the configured pretrained open_clip model (checks that it loads)."""
    cfg, _ = load(config)
    artifact = pack_clip(load_clip_for(cfg.clip))
    log_model(artifact, "clip")
    return artifact

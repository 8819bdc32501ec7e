"""Step 2: train a small CLIP on the pairs (only when no pretrained CLIP is configured)."""

import time
from pathlib import Path
from typing import Annotated, Any

from zenml import ArtifactConfig, step

from dalle2 import recipes
from dalle2.data import DatasetRef
from dalle2.models import ModelArtifact, pack_clip
from steps._shared import load, log_metrics, log_model, metrics_callback


@step(enable_cache=False)
def train_clip(
    config: dict[str, Any], dataset: DatasetRef
) -> Annotated[ModelArtifact, ArtifactConfig(name="clip")]:
    """DALL-E 2's first stage, here from scratch with open_clip's model and loss."""
    cfg, device = load(config)
    t0 = time.perf_counter()
    clip, result = recipes.train_clip(
        cfg.clip, Path(dataset.path), device, metrics_callback("clip"), cfg.progress
    )
    artifact = pack_clip(clip.cpu())
    acc = recipes.clip_retrieval_accuracy(clip, Path(dataset.path), cfg)
    log_metrics(
        {
            "clip/final_loss": result.final_loss,
            "clip/retrieval_acc_holdout": acc,
            "time/train_clip_s": time.perf_counter() - t0,
        }
    )
    log_model(artifact, "clip")
    return artifact


@step(enable_cache=False)
def load_pretrained_clip(
    config: dict[str, Any],
) -> Annotated[ModelArtifact, ArtifactConfig(name="clip")]:
    """Reference the configured pretrained open_clip model (checks that it loads)."""
    cfg, _ = load(config)
    clip = recipes.load_clip_for(cfg.clip, None)
    artifact = pack_clip(clip)
    log_model(artifact, "clip")
    return artifact

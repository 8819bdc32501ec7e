"""Step 5: one decoder unet; reused as train_decoder_unet_{i} for every stage."""

import time
from typing import Annotated, Any

from zenml import ArtifactConfig, step

from dalle2.data import DatasetRef, EmbeddingsRef
from dalle2.launch import train_stage
from dalle2.models import ModelArtifact
from steps._shared import load, log_model, log_training, metrics_callback


@step(enable_cache=False)
def train_decoder_unet(
    config: dict[str, Any], dataset: DatasetRef, embeddings: EmbeddingsRef, stage: int
) -> Annotated[ModelArtifact, ArtifactConfig(name="decoder_unet")]:
    """Stages are independent models: each one could train on its own machine."""
    cfg, device = load(config)
    if not 0 <= stage < len(cfg.decoder):
        raise ValueError(f"stage {stage} does not exist; the config has {len(cfg.decoder)}")
    t0 = time.perf_counter()
    name = f"decoder_unet_{stage}"
    inputs = {"shard_dir": dataset.path, "emb_dir": embeddings.path, "index": stage}
    artifact, result = train_stage(
        "decoder",
        cfg,
        inputs,
        device=device,
        callback=metrics_callback(name),
        progress=cfg.progress,
    )
    log_training(name, result, time.perf_counter() - t0)
    log_model(artifact, name)
    return artifact

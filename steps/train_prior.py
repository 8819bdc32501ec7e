"""Step 4: the diffusion prior, text embedding -> image embedding."""

import time
from typing import Annotated, Any

from zenml import ArtifactConfig, step

from dalle2.data import EmbeddingsRef
from dalle2.launch import train_stage
from dalle2.models import ModelArtifact
from steps._shared import load, log_model, log_training, metrics_callback


@step(enable_cache=False)
def train_prior(
    config: dict[str, Any], embeddings: EmbeddingsRef
) -> Annotated[ModelArtifact, ArtifactConfig(name="prior")]:
    """Reads embedding shards only: the prior never needs an image."""
    cfg, device = load(config)
    t0 = time.perf_counter()
    artifact, result = train_stage(
        "prior",
        cfg,
        {"emb_dir": embeddings.path},
        device=device,
        callback=metrics_callback("prior"),
        progress=cfg.progress,
    )
    log_training("prior", result, time.perf_counter() - t0)
    log_model(artifact, "prior")
    return artifact

"""Step 5: one decoder unet; reused as train_decoder_unet_{i} for every stage."""

import time
from pathlib import Path
from typing import Annotated, Any

from zenml import ArtifactConfig, step

from dalle2 import recipes
from dalle2.data import DatasetRef, EmbeddingsRef, load_embeddings, load_images, split_holdout
from dalle2.models import ModelArtifact, pack_stage
from steps._shared import load, log_metrics, log_model, metrics_callback


@step(enable_cache=False)
def train_decoder_unet(
    config: dict[str, Any], dataset: DatasetRef, embeddings: EmbeddingsRef, stage: int
) -> Annotated[ModelArtifact, ArtifactConfig(name="decoder_unet")]:
    """Stages are independent models: each one could train on its own machine."""
    cfg, device = load(config)
    if not 0 <= stage < len(cfg.decoder):
        raise ValueError(f"stage {stage} does not exist; the config has {len(cfg.decoder)}")
    t0 = time.perf_counter()
    emb = load_embeddings(Path(embeddings.path))
    images, keys = load_images(Path(dataset.path))
    if keys != emb.keys:
        raise RuntimeError("image shards and embedding shards hold different keys")
    keep = (~split_holdout(len(keys), cfg.data.holdout_fraction)).nonzero()[0]
    name = f"decoder_unet_{stage}"
    unet, result = recipes.train_decoder_stage(
        cfg.decoder[stage],
        images[keep],
        emb.image_embed[keep],
        device,
        metrics_callback(name),
        cfg.progress,
        desc=f"train_{name}",
    )
    artifact = pack_stage(unet.cpu(), stage)
    log_metrics(
        {
            f"{name}/final_loss": result.final_loss,
            f"{name}/samples_per_s": result.samples_per_s,
            f"time/train_{name}_s": time.perf_counter() - t0,
        }
    )
    log_model(artifact, name)
    return artifact

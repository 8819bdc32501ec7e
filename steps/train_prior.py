"""Step 4: the diffusion prior, text embedding -> image embedding."""

import time
from pathlib import Path
from typing import Annotated, Any

from zenml import ArtifactConfig, step

from dalle2 import recipes
from dalle2.data import EmbeddingsRef, load_embeddings, split_holdout
from dalle2.models import ModelArtifact, pack_prior
from steps._shared import load, log_metrics, log_model, metrics_callback


@step(enable_cache=False)
def train_prior(
    config: dict[str, Any], embeddings: EmbeddingsRef
) -> Annotated[ModelArtifact, ArtifactConfig(name="prior")]:
    cfg, device = load(config)
    t0 = time.perf_counter()
    emb = load_embeddings(Path(embeddings.path))
    train = emb.select((~split_holdout(len(emb.keys), cfg.data.holdout_fraction)).nonzero()[0])
    prior, result = recipes.train_prior(
        cfg.prior, train, device, metrics_callback("prior"), cfg.progress
    )
    artifact = pack_prior(prior.cpu())
    log_metrics(
        {
            "prior/final_loss": result.final_loss,
            "prior/samples_per_s": result.samples_per_s,
            "time/train_prior_s": time.perf_counter() - t0,
        }
    )
    log_model(artifact, "prior")
    return artifact

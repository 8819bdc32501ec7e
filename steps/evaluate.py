"""Step 6: sample held-out captions through prior and cascade; measure them."""

import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import mlflow
import pandas as pd
from zenml import ArtifactConfig, log_metadata, step

from dalle2 import recipes
from dalle2.data import DatasetRef, EmbeddingsRef, load_embeddings, load_images, split_holdout
from dalle2.decoder import Decoder
from dalle2.evaluation import image_grid
from dalle2.models import ModelArtifact, unpack_clip, unpack_prior, unpack_stage
from steps._shared import load, log_metrics, logger, tracking


@step(enable_cache=False)
def evaluate(
    config: dict[str, Any],
    dataset: DatasetRef,
    embeddings: EmbeddingsRef,
    clip: ModelArtifact,
    prior: ModelArtifact,
    decoder_unets: list[ModelArtifact],
) -> Annotated[dict[str, float], ArtifactConfig(name="metrics")]:
    cfg, device = load(config)
    t0 = time.perf_counter()
    emb = load_embeddings(Path(embeddings.path))
    hold = split_holdout(len(emb.keys), cfg.data.holdout_fraction).nonzero()[0]
    if len(hold) == 0:
        hold = range(len(emb.keys))  # no held-out split configured: evaluate on training pairs
        logger.warning("data.holdout_fraction is 0: evaluating on training pairs")
    holdout = emb.select(list(hold))
    images, keys = load_images(Path(dataset.path), set(holdout.keys))
    images = images[[keys.index(k) for k in holdout.keys]]  # aligned with holdout rows
    stages = [s for _, s in sorted(unpack_stage(a) for a in decoder_unets)]
    metrics, samples, captions = recipes.evaluate(
        cfg,
        unpack_clip(clip),
        unpack_prior(prior),
        Decoder(stages),
        holdout,
        images,
        device,
        cfg.progress,
    )
    metrics["time/evaluate_s"] = time.perf_counter() - t0
    log_metrics(metrics)
    log_metadata(metadata={k: float(v) for k, v in metrics.items()})
    grid = image_grid(samples[: cfg.eval.grid_size])
    if tracking():
        with tempfile.TemporaryDirectory() as tmp:
            grid.save(Path(tmp) / "samples.png")
            pd.DataFrame({"caption": captions[: cfg.eval.grid_size]}).to_csv(
                Path(tmp) / "samples_captions.csv", index_label="position"
            )
            mlflow.log_artifacts(tmp, artifact_path="samples")
    logger.info("evaluation: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics

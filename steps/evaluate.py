"""Step 6: sample held-out captions through prior and cascade; measure them."""

import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import mlflow
import pandas as pd
from zenml import ArtifactConfig, log_metadata, step

from dalle2.data import DatasetRef, EmbeddingsRef
from dalle2.decoder import Decoder
from dalle2.evaluation import image_grid
from dalle2.models import ModelArtifact, unpack_clip, unpack_prior, unpack_stage
from dalle2.recipes.evaluate import evaluate as evaluate_models
from dalle2.recipes.evaluate import holdout_pairs
from steps._shared import load, log_metrics, logger, tracking


@step
def evaluate(
    config: dict[str, Any],
    dataset: DatasetRef,
    embeddings: EmbeddingsRef,
    clip: ModelArtifact,
    prior: ModelArtifact,
    decoder_unets: list[ModelArtifact],
) -> Annotated[dict[str, float], ArtifactConfig(name="metrics")]:
    """Gets the whole config: sampling settings of every model are read here."""
    cfg, device = load(config)
    t0 = time.perf_counter()
    if cfg.data.holdout_fraction == 0:
        logger.warning("data.holdout_fraction is 0: evaluating on training pairs")
    pairs = holdout_pairs(cfg, Path(dataset.path), Path(embeddings.path))
    stages = [s for _, s in sorted(unpack_stage(a) for a in decoder_unets)]
    metrics, samples, captions = evaluate_models(
        cfg,
        unpack_clip(clip),
        unpack_prior(prior),
        Decoder(stages),
        pairs,
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

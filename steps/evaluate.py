"""Step 6: sample held-out and seen captions through prior and cascade; measure each."""

import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import mlflow
import numpy as np
import pandas as pd
from zenml import ArtifactConfig, log_metadata, step

from dalle2.data import DatasetRef, EmbeddingsRef, Holdout
from dalle2.decoder import Decoder
from dalle2.evaluation import image_grid
from dalle2.models import ModelArtifact, unpack_clip, unpack_prior, unpack_stage
from dalle2.recipes.evaluate import eval_pairs
from dalle2.recipes.evaluate import evaluate as evaluate_models
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
    """Sample prompts of held-out pairs and of training pairs, measure each set under its
    own name (unseen_captions/... and seen_captions/..., or heldout_pairs/... and
    train_pairs/... with data.holdout: pairs). Gets the whole config: the sampling
    settings of every model are read here."""
    cfg, device = load(config)
    t0 = time.perf_counter()
    held_name, seen_name = Holdout.of(cfg.data).names
    models = (
        unpack_clip(clip),
        unpack_prior(prior),
        Decoder([s for _, s in sorted(unpack_stage(a) for a in decoder_unets)]),
    )
    metrics: dict[str, float] = {}
    grid: tuple[np.ndarray, list[str]] | None = None
    for split, name in (("holdout", held_name), ("train", seen_name)):
        pairs = eval_pairs(cfg, Path(dataset.path), Path(embeddings.path), split)
        if not pairs:
            logger.warning("no %s to evaluate on (data.holdout_fraction)", name.replace("_", " "))
            continue
        found, samples, captions = evaluate_models(cfg, *models, pairs, device, cfg.progress)
        metrics.update({f"{name}/{k}": v for k, v in found.items()})
        if grid is None:  # the grid shows the held-out prompts when there are any
            grid = samples[: cfg.eval.grid_size], captions[: cfg.eval.grid_size]
    if grid is None:
        raise ValueError("no pairs to evaluate on: the dataset is empty")
    metrics["time/evaluate_s"] = time.perf_counter() - t0
    log_metrics(metrics)
    log_metadata(metadata={k: float(v) for k, v in metrics.items()})
    if tracking():
        with tempfile.TemporaryDirectory() as tmp:
            image_grid(grid[0]).save(Path(tmp) / "samples.png")
            pd.DataFrame({"caption": grid[1]}).to_csv(
                Path(tmp) / "samples_captions.csv", index_label="position"
            )
            mlflow.log_artifacts(tmp, artifact_path="samples")
    logger.info("evaluation: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics

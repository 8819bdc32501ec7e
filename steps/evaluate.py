"""Step 6: sample held-out and seen captions through prior and cascade; measure each."""

import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import mlflow
import pandas as pd
from zenml import ArtifactConfig, step

from dalle2.data.shards import DatasetRef, EmbeddingsRef, Holdout
from dalle2.evaluation import captioned_grid
from dalle2.models import ModelArtifact
from dalle2.recipes.evaluate import Evaluation, eval_pairs, eval_reference
from dalle2.recipes.evaluate import evaluate as evaluate_models
from dalle2.unclip import UnCLIP
from steps._tracking import log_metrics, logger, step_metadata, tracking
from steps._train import load


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
    train_pairs/... with data.holdout: pairs; unseen_{rule}/... for each of
    data.holdout_rules). Gets the whole config: the sampling
    settings of every model are read here."""
    cfg, device = load(config)
    t0 = time.perf_counter()
    unclip = UnCLIP.from_artifacts(clip, prior, decoder_unets).to(device)
    # the dataset's captions (retrieval candidates) and training embeddings, read once
    reference = eval_reference(cfg, unclip.clip, Path(embeddings.path), device, cfg.progress)
    metrics: dict[str, float] = {}
    grid: Evaluation | None = None
    for split, name in Holdout.of(cfg.data).sets:
        pairs = eval_pairs(cfg, Path(dataset.path), Path(embeddings.path), split)
        if not pairs:
            logger.warning("no %s to evaluate on (data.holdout_fraction)", name.replace("_", " "))
            continue
        found = evaluate_models(
            cfg, unclip, pairs, device, cfg.progress, reference=reference, split=split
        )
        metrics.update({f"{name}/{k}": v for k, v in found.metrics.items()})
        if grid is None:  # the grid shows the held-out prompts when there are any
            grid = found
    if grid is None:
        raise ValueError("no pairs to evaluate on: the dataset is empty")
    metrics["time/evaluate_s"] = time.perf_counter() - t0
    log_metrics(metrics)
    step_metadata({k: float(v) for k, v in metrics.items()})
    if tracking():
        with tempfile.TemporaryDirectory() as tmp:
            k = cfg.eval.grid_size
            captioned_grid(grid.generated[:k], grid.real[:k], grid.captions[:k]).save(
                Path(tmp) / "samples.png"
            )
            pd.DataFrame({"caption": grid.captions[:k]}).to_csv(
                Path(tmp) / "samples_captions.csv", index_label="position"
            )
            mlflow.log_artifacts(tmp, artifact_path="samples")
    logger.info("evaluation: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics

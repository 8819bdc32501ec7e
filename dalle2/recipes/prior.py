"""The diffusion prior: CLIP text embedding (and tokens) -> CLIP image embedding."""

from __future__ import annotations

from pathlib import Path

import torch

from dalle2.config import DataConfig, PriorConfig
from dalle2.data import shards as D
from dalle2.models import ModelArtifact, pack_prior
from dalle2.prior import DiffusionPrior
from dalle2.recipes.stage import Recipe, StageInputs
from dalle2.training.fit import Run, fit, seed_everything, stream
from dalle2.training.trainer import TrainResult

FIELDS = ("text_embed", "image_embed", "text_tokens", "text_mask")


def _as_float(batch: D.Batch, _rng: torch.Generator) -> D.Batch:
    """Embeddings are stored as float16; train on float32."""
    return {k: (v.float() if k != "text_mask" else v) for k, v in batch.items() if k in FIELDS}


def fit_prior(
    p: PriorConfig, data: DataConfig, emb_dir: Path, run: Run
) -> tuple[DiffusionPrior, TrainResult]:
    """Train the prior on the training pairs' embeddings (no image is read)."""
    seed_everything(p.train.seed)
    prior = DiffusionPrior(p)
    batches = stream(
        None, emb_dir, p.train, data, run, text_tokens=p.use_text_tokens, transform=_as_float
    )

    def loss_fn(model: torch.nn.Module, b: D.Batch) -> torch.Tensor:
        return model(b["text_embed"], b["image_embed"], b.get("text_tokens"), b.get("text_mask"))

    ema, result = fit(prior, p.train, loss_fn, batches, data, run, "train_prior")
    return ema, result


def _fit(
    p: PriorConfig, data: DataConfig, at: StageInputs, run: Run
) -> tuple[DiffusionPrior, TrainResult]:
    assert at.emb_dir is not None, "the prior trains on the embedding shards"
    return fit_prior(p, data, at.emb_dir, run)


def _pack(prior: DiffusionPrior, _at: StageInputs) -> ModelArtifact:
    return pack_prior(prior.cpu())


RECIPE = Recipe("prior", PriorConfig, _fit, _pack)

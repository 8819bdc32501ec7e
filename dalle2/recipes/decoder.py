"""One decoder unet: CLIP image embedding (and the previous stage's image) -> image."""

from __future__ import annotations

from pathlib import Path

import torch

from dalle2 import data as D
from dalle2.config import DataConfig, DecoderStageConfig
from dalle2.decoder import DecoderStage
from dalle2.recipes._fit import Run, fit, seed_everything, stream
from dalle2.trainer import TrainResult


def model_inputs(batch: D.Batch, _rng: torch.Generator) -> D.Batch:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], in the loader worker."""
    images = batch["image"].permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return {"image": images.contiguous(), "image_embed": batch["image_embed"].float()}


def fit_decoder_stage(
    s: DecoderStageConfig, index: int, data: DataConfig, shard_dir: Path, emb_dir: Path, run: Run
) -> tuple[DecoderStage, TrainResult]:
    """Train stage `index` on the training pairs; stages are independent of each other."""
    seed_everything(s.train.seed)
    stage = DecoderStage(s)
    batches = stream(shard_dir, emb_dir, s.train, data, run, transform=model_inputs)

    def loss_fn(model: torch.nn.Module, b: D.Batch) -> torch.Tensor:
        return model(b["image"], b["image_embed"])

    ema, result = fit(stage, s.train, loss_fn, batches, data, run, f"train_decoder_unet_{index}")
    return ema, result

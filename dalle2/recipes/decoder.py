"""One decoder unet: CLIP image embedding (caption tokens, previous stage's image) -> image."""

from __future__ import annotations

from pathlib import Path

import torch

from dalle2.config import DataConfig, DecoderStageConfig
from dalle2.data import shards as D
from dalle2.decoder import DecoderStage
from dalle2.models import ModelArtifact, pack_stage
from dalle2.recipes.stage import Recipe, StageInputs
from dalle2.training.fit import Run, fit, seed_everything, stream
from dalle2.training.trainer import TrainResult


def model_inputs(batch: D.Batch, _rng: torch.Generator) -> D.Batch:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], in the loader worker; stored
    float16 embeddings (and text tokens) -> float32."""
    images = batch["image"].permute(0, 3, 1, 2).float().div(127.5).sub(1)
    out = {"image": images.contiguous(), "image_embed": batch["image_embed"].float()}
    if "text_tokens" in batch:
        out |= {"text_tokens": batch["text_tokens"].float(), "text_mask": batch["text_mask"]}
    return out


def fit_decoder_stage(
    s: DecoderStageConfig, index: int, data: DataConfig, shard_dir: Path, emb_dir: Path, run: Run
) -> tuple[DecoderStage, TrainResult]:
    """Train stage `index` on the training pairs; stages are independent of each other."""
    seed_everything(s.train.seed)
    stage = DecoderStage(s)
    reads_text = stage.reads_text
    batches = stream(
        shard_dir, emb_dir, s.train, data, run, text_tokens=reads_text, transform=model_inputs
    )

    def loss_fn(model: torch.nn.Module, b: D.Batch) -> torch.Tensor:
        return model(b["image"], b["image_embed"], b.get("text_tokens"), b.get("text_mask"))

    ema, result = fit(stage, s.train, loss_fn, batches, data, run, f"train_decoder_unet_{index}")
    return ema, result


def _fit(
    s: DecoderStageConfig, data: DataConfig, at: StageInputs, run: Run
) -> tuple[DecoderStage, TrainResult]:
    assert at.shard_dir is not None and at.emb_dir is not None, "a unet reads both"
    return fit_decoder_stage(s, at.index, data, at.shard_dir, at.emb_dir, run)


def _pack(stage: DecoderStage, at: StageInputs) -> ModelArtifact:
    return pack_stage(stage.cpu(), at.index)


RECIPE = Recipe("decoder", DecoderStageConfig, _fit, _pack)

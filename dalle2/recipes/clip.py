"""DALL-E 2's first stage: a CLIP trained here (when no pretrained one is named)."""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from dalle2.clip import OpenClip, build_scratch_clip, load_pretrained_clip
from dalle2.config import ClipConfig, DataConfig
from dalle2.data import shards as D
from dalle2.training.fit import Run, fit, seed_everything, stream
from dalle2.training.trainer import TrainResult


def _flip(batch: D.Batch, rng: torch.Generator) -> D.Batch:
    """Random horizontal flips only: colours, shapes and sizes are what captions describe."""
    images = batch["image"]
    flip = torch.rand(images.shape[0], generator=rng) < 0.5
    images[flip] = images[flip].flip(2)
    return batch


def fit_clip(
    c: ClipConfig, data: DataConfig, shard_dir: Path, run: Run
) -> tuple[OpenClip, TrainResult]:
    """Train a small open_clip CLIP from scratch on the training pairs, with open_clip's loss
    (gathered over processes, so the contrastive batch is the global batch)."""
    seed_everything(c.train.seed)
    clip = build_scratch_clip(c.tower, D.read_captions(shard_dir))
    loss_core = open_clip.ClipLoss(
        gather_with_grad=run.world > 1, rank=run.rank, world_size=run.world
    )
    batches = stream(
        shard_dir,
        None,
        c.train,
        data,
        run,
        unique_captions=c.unique_captions_per_batch,
        transform=_flip if c.random_flip else None,
    )

    def loss_fn(model: torch.nn.Module, batch: D.Batch) -> torch.Tensor:
        img, txt, scale = model(batch["image"], clip.tokenize(batch["caption"]))
        return loss_core(img.float(), txt.float(), scale.float())

    ema, result = fit(clip, c.train, loss_fn, batches, data, run, "train_clip")
    return ema, result


@torch.no_grad()
def retrieval_accuracy(clip: OpenClip, shard_dir: Path, data: DataConfig, n: int = 512) -> float:
    """Share of held-out images (pairs CLIP never trained on; with data.holdout captions,
    captions it never read either) whose closest caption, among the distinct captions of
    those pairs, is their own; NaN without held-out pairs."""
    held = D.take(
        D.ShardStream(
            shard_dir,
            batch_size=256,
            split="holdout",
            holdout=D.Holdout.of(data),
            shuffle_buffer=0,
            epochs=1,
            drop_last=False,
        ),
        n,
    )
    if not held:
        return math.nan
    clip = clip.eval()
    vocab = sorted(set(held["caption"]))
    txt = torch.cat([clip.encode_text(vocab[i : i + 256]).embed for i in range(0, len(vocab), 256)])
    images = held["image"]
    img = torch.cat([clip.encode_image(images[i : i + 256]) for i in range(0, len(images), 256)])
    best = (F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).T).argmax(1)
    truth = torch.tensor([vocab.index(c) for c in held["caption"]], device=best.device)
    return float((best == truth).float().mean())


def load_clip_for(cfg: ClipConfig) -> OpenClip:
    """The configured pretrained CLIP."""
    if cfg.pretrained_model is None:
        raise ValueError("no CLIP: train one or set clip.pretrained_model")
    return load_pretrained_clip(cfg.pretrained_model, cfg.pretrained_weights)

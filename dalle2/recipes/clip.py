"""DALL-E 2's first stage: a CLIP trained here (when no pretrained one is named)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from dalle2.clip import OpenClip, build_scratch_clip, load_pretrained_clip
from dalle2.config import ClipConfig, DataConfig
from dalle2.data import shards as D
from dalle2.models import ModelArtifact, pack_clip
from dalle2.recipes.stage import Recipe, StageInputs
from dalle2.training.fit import Run, fit, seed_everything, stream
from dalle2.training.trainer import TrainResult


def _flip(batch: D.Batch, rng: torch.Generator) -> D.Batch:
    """Random horizontal flips only: colours, shapes and sizes are what captions describe."""
    images = batch["image"]
    flip = torch.rand(images.shape[0], generator=rng) < 0.5
    images[flip] = images[flip].flip(2)
    return batch


def word_negatives(captions: Sequence[str], how: str, rng: torch.Generator) -> list[str | None]:
    """A hard negative for each caption, made of the batch's own words; None where none can be.

    Only places where the batch's captions of the same word count differ are touched, so a
    template's fixed words stay. "swap" trades two of the caption's words there ("a red
    circle on a white background" -> "a white circle on a red background"); "replace" puts
    in the word another caption has there ("a red circle ..." -> "a red square ..."). Without
    them a contrastive CLIP can match a bag of words and lose which word binds to which
    (Yuksekgonul et al. 2023).
    """
    words = [c.split() for c in captions]
    groups: dict[int, list[list[str]]] = defaultdict(list)
    for w in words:
        groups[len(w)].append(w)
    # per word count: each place's words, where they differ
    places = {
        n: {
            k: there
            for k, col in enumerate(zip(*g, strict=True))
            if len(there := sorted(set(col))) > 1
        }
        for n, g in groups.items()
    }

    def pick(n: int) -> int:
        return int(torch.randint(n, (1,), generator=rng))

    out: list[str | None] = []
    for w in words:
        varying = places[len(w)]
        negative = list(w)
        if how == "swap":
            pairs = [(a, b) for a in varying for b in varying if a < b and w[a] != w[b]]
            if not pairs:
                out.append(None)
                continue
            a, b = pairs[pick(len(pairs))]
            negative[a], negative[b] = w[b], w[a]
        else:
            swaps = [(k, word) for k, there in varying.items() for word in there if word != w[k]]
            if not swaps:
                out.append(None)
                continue
            k, word = swaps[pick(len(swaps))]
            negative[k] = word
        out.append(" ".join(negative))
    return out


def _transform(c: ClipConfig) -> D.Transform | None:
    """Flips and hard negatives, in the loader's workers, from its per-batch generator (so a
    resumed run draws the same ones)."""
    if not c.random_flip and c.negatives == "none":
        return None

    def apply(batch: D.Batch, rng: torch.Generator) -> D.Batch:
        if c.random_flip:
            batch = _flip(batch, rng)
        if c.negatives != "none":
            batch["negative"] = word_negatives(batch["caption"], c.negatives, rng)
        return batch

    return apply


def negative_loss(
    img: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    scale: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of each image choosing its caption over its hard negative (normalised
    features; rows without a negative count nothing)."""
    logits = scale * torch.stack([(img * pos).sum(-1), (img * neg).sum(-1)], dim=1)
    losses = F.cross_entropy(logits, torch.zeros_like(valid, dtype=torch.long), reduction="none")
    return (losses * valid).sum() / valid.sum().clamp(min=1)


def fit_clip(
    c: ClipConfig, data: DataConfig, shard_dir: Path, run: Run
) -> tuple[OpenClip, TrainResult]:
    """Train a small open_clip CLIP from scratch on the training pairs, with open_clip's loss
    (gathered over processes, so the contrastive batch is the global batch), plus, with
    `negatives`, each image's choice between its caption and a hard negative."""
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
        transform=_transform(c),
    )

    def loss_fn(model: torch.nn.Module, batch: D.Batch) -> torch.Tensor:
        captions = batch["caption"]
        if c.negatives == "none":
            img, txt, scale = model(batch["image"], clip.tokenize(captions))
            return loss_core(img.float(), txt.float(), scale.float())
        # one text batch of 2B rows (captions, then negatives or the caption itself), so the
        # shapes never change under DDP or torch.compile
        negatives = [n or cap for n, cap in zip(batch["negative"], captions, strict=True)]
        img, txt, scale = model(batch["image"], clip.tokenize([*captions, *negatives]))
        img, txt, scale = img.float(), txt.float(), scale.float()
        pos, neg = txt[: len(captions)], txt[len(captions) :]
        valid = torch.tensor([n is not None for n in batch["negative"]], dtype=img.dtype)
        return loss_core(img, pos, scale) + negative_loss(
            img, pos, neg, scale, valid.to(img.device)
        )

    ema, result = fit(clip, c.train, loss_fn, batches, data, run, "train_clip")
    return ema, result


def _fit(
    c: ClipConfig, data: DataConfig, at: StageInputs, run: Run
) -> tuple[OpenClip, TrainResult]:
    assert at.shard_dir is not None, "CLIP trains on the image shards"
    return fit_clip(c, data, at.shard_dir, run)


def _pack(clip: OpenClip, _at: StageInputs) -> ModelArtifact:
    return pack_clip(clip.cpu())


RECIPE = Recipe("clip", ClipConfig, _fit, _pack)


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

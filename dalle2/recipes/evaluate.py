"""The metrics of a run: its models prompted with held-out and training captions."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from dalle2.config import UnclipConfig
from dalle2.data import shards as D
from dalle2.evaluation import (
    caption_ranks,
    clip_score,
    empty_canvas,
    frechet_distance,
    nearest_cosine_distance,
    other_caption_partners,
    prior_similarities,
    retrieval_summary,
    to_uint8,
)
from dalle2.unclip import UnCLIP

if TYPE_CHECKING:  # open_clip takes seconds to import: only the step that loads CLIP pays
    from dalle2.clip import ClipEncoder, OpenClip

# Training image embeddings the memorisation check reads (~50 MB float16 at E = 512). A
# nearest neighbour among a subset is never nearer than among all, so past the cap the
# check can only under-report copying; real held-out images are measured the same way.
MAX_TRAIN_EMBEDS = 50_000


def eval_pairs(
    cfg: UnclipConfig,
    shard_dir: Path,
    emb_dir: Path | None,
    split: D.Split,
    text_tokens: bool = False,
) -> D.Batch:
    """eval.num_prompts pairs of `split` to prompt with, spread over its distinct captions
    (taken in turn, in shard order), with their images (and embeddings, given emb_dir, with
    the caption tokens if asked); {} when empty."""
    pool = D.take(
        D.ShardStream(
            shard_dir,
            emb_dir,
            batch_size=cfg.eval.batch_size,
            split=split,
            holdout=D.Holdout.of(cfg.data),
            text_tokens=text_tokens,
            shuffle_buffer=0,
            epochs=1,
            drop_last=False,
        ),
        4 * cfg.eval.num_prompts,
    )
    if not pool:
        return {}
    by_caption: dict[str, list[int]] = {}
    for i, caption in enumerate(pool["caption"]):
        by_caption.setdefault(caption, []).append(i)
    turns = itertools.zip_longest(*by_caption.values())
    order = [i for turn in turns for i in turn if i is not None][: cfg.eval.num_prompts]
    return {
        k: v[order] if isinstance(v, torch.Tensor) else [v[i] for i in order]
        for k, v in pool.items()
    }


def read_distinct_captions(emb_dir: Path) -> list[str]:
    """Every distinct caption of the embedding shards, of all splits, sorted.

    These are the candidates caption retrieval ranks: held-out captions among them, so an
    image of an unseen prompt has to beat every caption the dataset has, its own included.
    """
    captions: set[str] = set()
    for name in D.embedding_names(emb_dir):
        frame = pd.read_parquet(Path(emb_dir) / f"{name}.parquet", columns=["caption"])
        captions.update(frame["caption"].astype(str))
    return sorted(captions)


def read_train_image_embeds(
    emb_dir: Path, holdout: D.Holdout, limit: int = MAX_TRAIN_EMBEDS
) -> Tensor:
    """(T, E) float16 image embeddings of training pairs, as stored, in shard order.

    At most `limit` rows (the first ones), to bound memory on large datasets. Only the
    image_embed array of each shard is loaded, never the (much larger) token encodings.
    """
    parts: list[Tensor] = []
    got = 0
    for name in D.embedding_names(emb_dir):
        meta = pd.read_parquet(Path(emb_dir) / f"{name}.parquet", columns=["key", "caption"])
        keep = np.array(
            [
                holdout.keeps("train", k, c)
                for k, c in zip(meta["key"], meta["caption"], strict=True)
            ],
            dtype=bool,
        )
        with np.load(Path(emb_dir) / f"{name}.npz") as z:
            rows = z["image_embed"]
        if len(rows) != len(keep):
            raise D.AlignmentError(
                f"embedding shard {name}: {len(rows)} image embeddings for {len(keep)} keys; "
                "rerun compute_clip_embeddings"
            )
        parts.append(torch.from_numpy(rows[keep][: limit - got]))
        got += len(parts[-1])
        if got >= limit:
            break
    return torch.cat(parts)


@dataclass(frozen=True)
class EvalReference:
    """What every prompt set is measured against: read and encoded once per evaluate step."""

    captions: list[str]  # every distinct caption of the dataset: the retrieval candidates
    caption_embeds: Tensor  # (C, E) CLIP text embeddings of `captions`, on the CPU
    # (T, E) float16 image embeddings of training pairs (capped), precomputed by this CLIP
    train_embeds: Tensor


@torch.no_grad()
def eval_reference(
    cfg: UnclipConfig,
    clip: OpenClip,
    emb_dir: Path,
    device: torch.device,
    progress: bool = False,
    max_train: int = MAX_TRAIN_EMBEDS,
) -> EvalReference:
    """The dataset's distinct captions encoded by `clip`, in batches, and the training
    image embeddings (up to `max_train`) that generated images must not copy."""
    captions = read_distinct_captions(emb_dir)
    clip = clip.to(device).eval()
    size = cfg.eval.batch_size
    chunks = range(0, len(captions), size)
    embeds = [
        clip.encode_text(captions[i : i + size]).embed.float().cpu()
        for i in tqdm(chunks, desc="encode captions", disable=not progress)
    ]
    train = read_train_image_embeds(emb_dir, D.Holdout.of(cfg.data), max_train)
    return EvalReference(captions, torch.cat(embeds), train)


def _image_embeds(clip: ClipEncoder, images: Tensor, batch_size: int) -> Tensor:
    """(N, E) CLIP embeddings on the CPU of uint8 (N, 3, H, W) images, in batches."""
    return torch.cat(
        [
            clip.encode_image(images[i : i + batch_size].permute(0, 2, 3, 1).contiguous())
            .float()
            .cpu()
            for i in range(0, len(images), batch_size)
        ]
    )


@torch.no_grad()
def caption_metrics(
    clip: ClipEncoder,
    generated: Tensor,
    real: Tensor,
    captions: list[str],
    reference: EvalReference,
    *,
    split: D.Split,
    batch_size: int = 32,
) -> dict[str, float]:
    """Caption retrieval and the memorisation check of one prompt set.

    Retrieval ranks each image's prompt among all of `reference.captions` (retrieval_top1,
    _top5, _median_rank) for the generated images; with the suffix _real for the prompts'
    real images (the ceiling this CLIP allows); with _floor for the real image of the next
    prompt whose caption differs (cyclically), ranked against the prompt's caption: what a
    model that ignores its prompt scores. Memorisation: nn_train_distance, the mean of
    1 - max cosine of each generated image to the training image embeddings; for held-out
    prompts also nn_train_distance_real, the same for their real images, which training
    never saw: a model that generalises lands near it, one that copies training images far
    below. For training prompts the real images are training images, so no _real figure.

    `generated` and `real` are uint8 (N, 3, H, W).
    """
    index = {c: i for i, c in enumerate(reference.captions)}
    missing = [c for c in captions if c not in index]
    if missing:
        raise ValueError(
            f"prompt {missing[0]!r} is not among the embedding shards' captions; "
            "rerun compute_clip_embeddings on this dataset"
        )
    targets = torch.tensor([index[c] for c in captions])
    gen = _image_embeds(clip, generated, batch_size)
    ref = _image_embeds(clip, real, batch_size)
    metrics = {"retrieval_num_captions": float(len(reference.captions))}
    sets = [("", gen), ("_real", ref)]
    partners = other_caption_partners(captions)
    if partners:  # a single caption has no other caption's image to stand in for it
        sets.append(("_floor", ref[partners]))
    for suffix, embeds in sets:
        ranks = caption_ranks(embeds, reference.caption_embeds, targets)
        metrics.update({f"retrieval_{k}{suffix}": v for k, v in retrieval_summary(ranks).items()})
    if len(reference.train_embeds):  # everything held out: nothing to copy
        train = reference.train_embeds
        metrics["nn_train_distance"] = float(nearest_cosine_distance(gen, train).mean())
        if split not in ("train", "all"):  # any held-out set: images no model trained on
            metrics["nn_train_distance_real"] = float(nearest_cosine_distance(ref, train).mean())
    return metrics


@dataclass(frozen=True)
class Evaluation:
    """One prompt set's metrics and the images they measured (for the sample grid)."""

    metrics: dict[str, float]
    generated: np.ndarray  # (N, H, W, 3) uint8
    real: np.ndarray  # (N, H, W, 3) uint8: the prompts' own images, at the generated size
    captions: list[str]


def evaluate(
    cfg: UnclipConfig,
    unclip: UnCLIP,
    pairs: D.Batch,
    device: torch.device,
    progress: bool = True,
    *,
    reference: EvalReference,
    split: D.Split,
) -> Evaluation:
    """Sample the pairs' captions and measure them against their real images and `reference`.

    `pairs` holds "caption", "image" (N, H, W, 3) uint8 and "image_embed" (N, E) rows of
    `split`.
    """
    from dalle2.data import shapes64

    captions = list(pairs["caption"])
    n = len(captions)
    t0 = time.perf_counter()
    drawn = unclip.to(device).generate(
        captions, seed=cfg.eval.seed, batch_size=cfg.eval.batch_size, progress=progress
    )
    images, embeds, clip = drawn.images, drawn.embeds, unclip.clip
    metrics: dict[str, float] = {"sample_seconds_per_image": (time.perf_counter() - t0) / n}
    gen_u8 = to_uint8(images)
    ref = pairs["image"].permute(0, 3, 1, 2)
    if ref.shape[-1] != gen_u8.shape[-1]:
        ref = to_uint8(
            F.interpolate(ref.float() / 255, size=gen_u8.shape[-1], mode="bilinear", antialias=True)
        )
    metrics.update(
        frechet_distance(
            gen_u8,
            ref,
            clip=clip,
            inception_weights=cfg.eval.inception_weights,
            batch_size=cfg.eval.batch_size,
        )
    )
    with torch.no_grad():
        metrics["clip_score"] = clip_score(clip, gen_u8, captions)
        metrics["clip_score_real"] = clip_score(clip, ref, captions)
        enc = clip.encode_text(captions)
    metrics.update(
        prior_similarities(embeds, pairs["image_embed"].float(), enc.embed.float().cpu())
    )
    metrics.update(
        caption_metrics(
            clip, gen_u8, ref, captions, reference, split=split, batch_size=cfg.eval.batch_size
        )
    )
    metrics["empty_canvas"] = float(empty_canvas(gen_u8).sum())  # prompts drawn as nothing
    hwc = gen_u8.permute(0, 2, 3, 1).numpy()
    try:
        fidelity = shapes64.prompt_fidelity(list(hwc), captions)
        metrics.update({f"fidelity_{k}": v for k, v in fidelity.items()})
    except ValueError:
        pass  # captions outside the shapes64 grammar: no pixel-level reading possible
    return Evaluation(metrics, hwc, ref.permute(0, 2, 3, 1).contiguous().numpy(), captions)

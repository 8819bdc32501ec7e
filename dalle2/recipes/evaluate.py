"""Sampling prompts through prior and cascade, and the metrics of a run."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dalle2 import data as D
from dalle2.clip import OpenClip
from dalle2.config import SampleConfig, UnclipConfig
from dalle2.decoder import Decoder
from dalle2.device import autocast, autocast_dtype
from dalle2.evaluation import clip_score, frechet_distance, prior_similarities, to_uint8
from dalle2.prior import DiffusionPrior


class NonFiniteOutputError(RuntimeError):
    """The models produced NaN or infinite values: there is no image to write."""


@torch.no_grad()
def generate(
    clip: OpenClip,
    prior: DiffusionPrior,
    decoder: Decoder,
    captions: list[str],
    *,
    device: torch.device,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    decoder_cfgs: Sequence[SampleConfig | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) in [0, 1] and the prior's image embeddings (N, E) for captions.

    `decoder_cfgs` replaces the sampling settings of some decoder stages (None keeps a
    stage's own), so a served model can take guidance and steps per request.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    clip, prior, decoder = clip.to(device).eval(), prior.to(device).eval(), decoder.to(device)
    dtype = autocast_dtype(device, "auto")
    out_images, out_embeds = [], []
    chunks = range(0, len(captions), batch_size)
    for start in tqdm(chunks, desc="sample", disable=not progress):
        caps = captions[start : start + batch_size]
        enc = clip.encode_text(caps, with_tokens=prior.cfg.use_text_tokens or decoder.reads_text)
        tokens = None if enc.tokens is None else enc.tokens.float()
        with autocast(device, dtype):
            embed = prior.sample(enc.embed.float(), tokens, enc.mask, generator=gen)
            images = decoder.sample(embed, tokens, enc.mask, cfgs=decoder_cfgs, generator=gen)
        if not bool(torch.isfinite(images).all() and torch.isfinite(embed).all()):
            raise NonFiniteOutputError(
                f"sampling produced NaN or infinite values for prompts {start}.."
                f"{start + len(caps) - 1}; no images were written (check the models' weights "
                "and sampling settings)"
            )
        out_images.append(images.float().cpu())
        out_embeds.append(embed.float().cpu())
    return torch.cat(out_images), torch.cat(out_embeds)


def eval_pairs(cfg: UnclipConfig, shard_dir: Path, emb_dir: Path | None, split: D.Split) -> D.Batch:
    """eval.num_prompts pairs of `split` to prompt with, spread over its distinct captions
    (taken in turn, in shard order), with their images (and embeddings, given emb_dir);
    {} when empty."""
    pool = D.take(
        D.ShardStream(
            shard_dir,
            emb_dir,
            batch_size=cfg.eval.batch_size,
            split=split,
            holdout=D.Holdout.of(cfg.data),
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


def evaluate(
    cfg: UnclipConfig,
    clip: OpenClip,
    prior: DiffusionPrior,
    decoder: Decoder,
    pairs: D.Batch,
    device: torch.device,
    progress: bool = True,
) -> tuple[dict[str, float], np.ndarray, list[str]]:
    """Sample the pairs' captions and measure them; returns metrics, images (N,H,W,3), captions.

    `pairs` holds "caption", "image" (N, H, W, 3) uint8 and "image_embed" (N, E) rows.
    """
    from dalle2 import synthetic

    captions = list(pairs["caption"])
    n = len(captions)
    t0 = time.perf_counter()
    images, embeds = generate(
        clip,
        prior,
        decoder,
        captions,
        device=device,
        batch_size=cfg.eval.batch_size,
        seed=cfg.eval.seed,
        progress=progress,
    )
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
    hwc = gen_u8.permute(0, 2, 3, 1).numpy()
    try:
        fidelity = synthetic.prompt_fidelity(list(hwc), captions)
        metrics.update({f"fidelity_{k}": v for k, v in fidelity.items()})
    except ValueError:
        pass  # captions outside the shapes64 grammar: no pixel-level reading possible
    return metrics, hwc, captions

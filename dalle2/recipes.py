"""One function per pipeline stage: config and data in, trained model or metrics out.

ZenML steps are thin wrappers around these; metrics leave through `callback` so the
library never imports a tracker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dalle2 import data as D
from dalle2.clip import OpenClip, build_scratch_clip, load_pretrained_clip
from dalle2.config import ClipConfig, DecoderStageConfig, PriorConfig, UnclipConfig
from dalle2.decoder import Decoder, DecoderStage
from dalle2.device import autocast, autocast_dtype
from dalle2.evaluation import clip_score, frechet_distance, prior_similarities, to_uint8
from dalle2.prior import DiffusionPrior
from dalle2.trainer import MetricsCallback, Trainer, TrainResult

Callback = MetricsCallback | None


def _seed(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def _to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1)


# ------------------------------------------------------------------------------ CLIP


def train_clip(
    cfg: ClipConfig,
    shard_dir: Path,
    device: torch.device,
    callback: Callback = None,
    progress: bool = True,
) -> tuple[OpenClip, TrainResult]:
    """Train a small open_clip CLIP from scratch on the downloaded pairs."""
    images, _, captions = D.load_pairs(shard_dir)
    rng = _seed(cfg.train.seed)
    clip = build_scratch_clip(cfg.tower, captions).to(device)
    ids = clip.tokenize(captions).cpu()
    images_t = torch.from_numpy(images)
    loss_fn_core = open_clip.ClipLoss()

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        source = (
            D.unique_caption_batches(captions, cfg.train.batch_size, rng)
            if cfg.unique_captions_per_batch
            else D.random_batches(len(captions), cfg.train.batch_size, rng)
        )
        for idx in source:
            yield _augment_clip(images_t[idx], rng), ids[idx]

    def loss_fn(model: OpenClip, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        img, txt, scale = model(*batch)
        return loss_fn_core(img.float(), txt.float(), scale.float())

    trainer = Trainer(
        clip,
        cfg.train,
        loss_fn,
        device=device,
        callback=callback,
        progress=progress,
        desc="train_clip",
    )
    result = trainer.fit(batches())
    ema = trainer.ema
    return ema.eval(), result


@torch.no_grad()
def clip_retrieval_accuracy(clip: OpenClip, shard_dir: Path, cfg: UnclipConfig) -> float:
    """Share of held-out images whose closest caption (among all captions) is their own."""
    images, keys, captions = D.load_pairs(shard_dir)
    hold = D.split_holdout(len(keys), cfg.data.holdout_fraction).nonzero()[0]
    if len(hold) == 0:
        hold = np.arange(len(keys))
    hold = hold[:512]
    vocab = sorted(set(captions))
    clip = clip.eval()
    txt = torch.cat([clip.encode_text(vocab[i : i + 256]).embed for i in range(0, len(vocab), 256)])
    img = torch.cat(
        [
            clip.encode_image(torch.from_numpy(images[hold[i : i + 256]]))
            for i in range(0, len(hold), 256)
        ]
    )
    best = (F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).T).argmax(1)
    truth = torch.tensor([vocab.index(captions[i]) for i in hold], device=best.device)
    return float((best == truth).float().mean())


def _augment_clip(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random horizontal flips only: colours, shapes and sizes are what captions describe."""
    if rng.random() < 0.5:
        return images.flip(2)
    return images


def load_clip_for(cfg: ClipConfig, trained: OpenClip | None) -> OpenClip:
    """The pipeline's CLIP: the trained one, else the configured pretrained one."""
    if trained is not None:
        return trained
    if cfg.pretrained_model is None:
        raise ValueError("no CLIP: train one or set clip.pretrained_model")
    return load_pretrained_clip(cfg.pretrained_model, cfg.pretrained_weights)


# ------------------------------------------------------------------------------ embeddings


@torch.no_grad()
def compute_embeddings(
    clip: OpenClip,
    shard_dir: Path,
    out_dir: Path,
    *,
    with_tokens: bool,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> int:
    """Embed every shard, one shard in memory at a time; returns the number of pairs."""
    clip = clip.to(device).eval()
    half = device.type == "cuda"
    total = 0
    paths = D.shard_paths(shard_dir)
    bar = tqdm(total=None, desc="embed", unit="img", disable=not progress)
    for path in paths:
        samples = list(D.iter_shard(path))
        arrays: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            imgs = torch.from_numpy(np.stack([s.image for s in chunk])).to(device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=half):
                img = clip.encode_image(imgs)
                enc = clip.encode_text([s.caption for s in chunk], with_tokens=with_tokens)
            arrays.setdefault("image_embed", []).append(img.float().cpu().half().numpy())
            arrays.setdefault("text_embed", []).append(enc.embed.float().cpu().half().numpy())
            if with_tokens:
                arrays.setdefault("text_tokens", []).append(enc.tokens.float().cpu().half().numpy())
                arrays.setdefault("text_mask", []).append(enc.mask.cpu().numpy())
            bar.update(len(chunk))
        D.write_embedding_shard(
            out_dir,
            path.stem,
            [s.key for s in samples],
            [s.caption for s in samples],
            {k: np.concatenate(v) for k, v in arrays.items()},
        )
        total += len(samples)
    bar.close()
    check_alignment(shard_dir, out_dir)
    return total


def check_alignment(shard_dir: Path, emb_dir: Path) -> None:
    """Raise if an embedding shard's keys differ from its tar's keys (order included)."""
    for path in D.shard_paths(shard_dir):
        keys = [s.key for s in D.iter_shard(path)]
        emb_keys = pd.read_parquet(emb_dir / f"{path.stem}.parquet")["key"].tolist()
        if keys != emb_keys:
            raise RuntimeError(f"embedding keys of shard {path.stem} do not match its tar")


# ------------------------------------------------------------------------------ prior


def train_prior(
    cfg: PriorConfig,
    emb: D.Embeddings,
    device: torch.device,
    callback: Callback = None,
    progress: bool = True,
) -> tuple[DiffusionPrior, TrainResult]:
    rng = _seed(cfg.train.seed)
    prior = DiffusionPrior(cfg).to(device)
    use_tokens = cfg.use_text_tokens and emb.text_tokens is not None

    def batches() -> Iterator[tuple]:
        for idx in D.random_batches(len(emb.keys), cfg.train.batch_size, rng):
            i = torch.from_numpy(idx)
            if use_tokens:
                yield emb.text_embed[i], emb.image_embed[i], emb.text_tokens[i], emb.text_mask[i]
            else:
                yield emb.text_embed[i], emb.image_embed[i]

    def loss_fn(model: DiffusionPrior, batch: tuple) -> torch.Tensor:
        return model.loss(*batch)

    trainer = Trainer(
        prior,
        cfg.train,
        loss_fn,
        device=device,
        callback=callback,
        progress=progress,
        desc="train_prior",
    )
    result = trainer.fit(batches())
    return trainer.ema.eval(), result


# ------------------------------------------------------------------------------ decoder


def train_decoder_stage(
    cfg: DecoderStageConfig,
    images: np.ndarray,
    image_embed: torch.Tensor,
    device: torch.device,
    callback: Callback = None,
    progress: bool = True,
    desc: str = "train_decoder",
) -> tuple[DecoderStage, TrainResult]:
    """Train one stage on uint8 images (N, H, W, 3) and their CLIP image embeddings."""
    rng = _seed(cfg.train.seed)
    stage = DecoderStage(cfg).to(device)
    images_t = torch.from_numpy(images)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in D.random_batches(len(images_t), cfg.train.batch_size, rng):
            i = torch.from_numpy(idx)
            x = _to_float_images(images_t[i])
            yield x, image_embed[i]

    def loss_fn(model: DecoderStage, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model.loss(*batch)

    trainer = Trainer(
        stage, cfg.train, loss_fn, device=device, callback=callback, progress=progress, desc=desc
    )
    result = trainer.fit(batches())
    return trainer.ema.eval(), result


# ------------------------------------------------------------------------------ generation


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) in [0, 1] and the prior's image embeddings (N, E) for captions."""
    gen = torch.Generator(device=device).manual_seed(seed)
    clip, prior, decoder = clip.to(device).eval(), prior.to(device).eval(), decoder.to(device)
    dtype = autocast_dtype(device, "auto")
    out_images, out_embeds = [], []
    chunks = range(0, len(captions), batch_size)
    for start in tqdm(chunks, desc="sample", disable=not progress):
        caps = captions[start : start + batch_size]
        enc = clip.encode_text(caps, with_tokens=prior.cfg.use_text_tokens)
        with autocast(device, dtype):
            embed = prior.sample(enc.embed.float(), enc.tokens, enc.mask, generator=gen)
            images = decoder.sample(embed, generator=gen)
        out_images.append(images.float().cpu())
        out_embeds.append(embed.float().cpu())
    return torch.cat(out_images), torch.cat(out_embeds)


def evaluate(
    cfg: UnclipConfig,
    clip: OpenClip,
    prior: DiffusionPrior,
    decoder: Decoder,
    holdout: D.Embeddings,
    reference_images: np.ndarray,  # (N, H, W, 3) uint8, row i is holdout pair i
    device: torch.device,
    progress: bool = True,
) -> tuple[dict[str, float], np.ndarray, list[str]]:
    """Sample held-out captions and measure them; returns metrics, images (N,H,W,3), captions."""
    from dalle2 import synthetic

    n = min(cfg.eval.num_prompts, len(holdout.keys))
    if n == 0:
        raise ValueError("no held-out pairs to evaluate on; raise data.holdout_fraction")
    pick = np.random.default_rng(cfg.eval.seed).choice(len(holdout.keys), n, replace=False)
    sub = holdout.select(pick)
    t0 = time.perf_counter()
    images, embeds = generate(
        clip,
        prior,
        decoder,
        sub.captions,
        device=device,
        batch_size=cfg.eval.batch_size,
        seed=cfg.eval.seed,
        progress=progress,
    )
    metrics: dict[str, float] = {"sample_seconds_per_image": (time.perf_counter() - t0) / n}
    gen_u8 = to_uint8(images)
    ref = torch.from_numpy(reference_images).permute(0, 3, 1, 2)
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
        metrics["clip_score"] = clip_score(clip, gen_u8, sub.captions)
        metrics["clip_score_real"] = clip_score(clip, ref[torch.from_numpy(pick)], sub.captions)
        enc = clip.encode_text(sub.captions)
    metrics.update(prior_similarities(embeds, sub.image_embed, enc.embed.float().cpu()))
    hwc = gen_u8.permute(0, 2, 3, 1).numpy()
    try:
        fidelity = synthetic.prompt_fidelity(list(hwc), sub.captions)
        metrics.update({f"fidelity_{k}": v for k, v in fidelity.items()})
    except ValueError:
        pass  # captions outside the shapes64 grammar: no pixel-level reading possible
    return metrics, hwc, sub.captions

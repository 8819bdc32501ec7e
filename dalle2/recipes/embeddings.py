"""CLIP embeddings of every pair, written shard by shard next to the image shards' keys."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from dalle2.data import shards as D

if TYPE_CHECKING:  # open_clip takes seconds to import; the CLIP handed in brings it
    from dalle2.clip import OpenClip


@torch.no_grad()
def _embed_shard(
    clip: OpenClip, tar: Path, out_dir: Path, with_tokens: bool, batch_size: int, bar: tqdm
) -> int:
    device = clip.device
    keys: list[str] = []
    captions: list[str] = []
    arrays: dict[str, list[np.ndarray]] = {}

    def flush(images: list[np.ndarray], caps: list[str]) -> None:
        imgs = torch.from_numpy(np.stack(images)).to(device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            img = clip.encode_image(imgs)
            enc = clip.encode_text(caps, with_tokens=with_tokens)
        parts = {"image_embed": img, "text_embed": enc.embed}
        if with_tokens:
            parts |= {"text_tokens": enc.tokens}
            arrays.setdefault("text_mask", []).append(enc.mask.cpu().numpy())
        for name, t in parts.items():
            arrays.setdefault(name, []).append(t.float().cpu().half().numpy())
        bar.update(len(caps))

    images: list[np.ndarray] = []
    chunk: list[str] = []
    for raw in D.tar_samples(tar):
        keys.append(raw["__key__"])
        chunk.append(D.caption_of(raw))
        images.append(D.decode_image(raw))
        if len(chunk) == batch_size:
            flush(images, chunk)
            captions += chunk
            images, chunk = [], []
    if chunk:
        flush(images, chunk)
        captions += chunk
    if not keys:
        raise ValueError(f"image shard {tar} holds no samples")
    D.write_embedding_shard(
        out_dir, tar.stem, keys, captions, {k: np.concatenate(v) for k, v in arrays.items()}
    )
    return len(keys)


def compute_embeddings(
    clip: OpenClip,
    shard_dir: Path,
    out_dir: Path,
    *,
    with_tokens: bool,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[int, int]:
    """Embed every shard that has no verified embedding shard yet, one shard in memory at a
    time, so a rerun after a crash resumes at the first missing shard.

    Returns:
        (pairs embedded in all shards, shards computed in this call).
    """
    clip = clip.to(device).eval()
    total = computed = 0
    bar = tqdm(desc="embed", unit="img", disable=not progress)
    for tar in D.shard_paths(shard_dir):
        if D.embedding_shard_ok(tar, out_dir, with_tokens):
            total += len(D.tar_keys(tar))
            continue
        total += _embed_shard(clip, tar, out_dir, with_tokens, batch_size, bar)
        computed += 1
    bar.close()
    return total, computed

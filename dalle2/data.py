"""Readers for img2dataset webdataset shards and the embedding shards made from them.

Layout under a dataset directory (what img2dataset writes, plus our embeddings):
    shards/00000.tar            {key}.png|jpg|webp, {key}.txt, {key}.json
    embeddings/00000.npz        image_embed (N, E) float16, text_embed (N, E) float16,
                                optional text_tokens (N, L, D) float16 + text_mask (N, L)
    embeddings/00000.parquet    key, caption: row i of the npz belongs to this key
Shards are streamed one at a time so memory stays bounded by the shard size.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pydantic import BaseModel

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


class DatasetRef(BaseModel):
    """A downloaded, DVC-versioned dataset: what the download step hands on."""

    path: str  # directory of webdataset shards
    md5: str  # DVC md5 of the directory: names the data snapshot
    num_samples: int
    num_failed: int = 0
    skipped_download: bool = False


class EmbeddingsRef(BaseModel):
    """Embedding shards computed from a dataset by one CLIP."""

    path: str
    data_md5: str
    clip_id: str
    num_samples: int
    with_tokens: bool = False


@dataclass
class Sample:
    """One image-caption pair read from a shard."""

    key: str
    caption: str
    image: np.ndarray  # (H, W, 3) uint8


def shard_paths(shard_dir: Path) -> list[Path]:
    """The .tar shards of a directory, in a stable order."""
    paths = sorted(Path(shard_dir).glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"no .tar shards in {shard_dir}; run the download step first")
    return paths


def iter_shard(path: Path) -> Iterator[Sample]:
    """Samples of one webdataset tar, grouped by key, in the tar's order."""
    members: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.rpartition(".")
            f = tar.extractfile(info)
            if f is None:
                continue
            if key not in members:
                members[key] = {}
                order.append(key)
            members[key]["." + ext.lower()] = f.read()
    for key in order:
        parts = members[key]
        img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if img_ext is None or ".txt" not in parts:
            continue
        image = np.asarray(Image.open(io.BytesIO(parts[img_ext])).convert("RGB"))
        yield Sample(key, parts[".txt"].decode("utf-8").strip(), image)


def load_pairs(
    shard_dir: Path, keys: set[str] | None = None
) -> tuple[np.ndarray, list[str], list[str]]:
    """Images (N, H, W, 3) uint8, keys and captions in one pass over the shards."""
    images, out_keys, captions = [], [], []
    for path in shard_paths(shard_dir):
        for s in iter_shard(path):
            if keys is None or s.key in keys:
                images.append(s.image)
                out_keys.append(s.key)
                captions.append(s.caption)
    return np.stack(images), out_keys, captions


def load_images(shard_dir: Path, keys: set[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """All images (N, H, W, 3) uint8 and their keys, optionally only the given keys."""
    images, out_keys, _ = load_pairs(shard_dir, keys)
    return images, out_keys


def write_embedding_shard(
    out_dir: Path,
    name: str,
    keys: Sequence[str],
    captions: Sequence[str],
    arrays: dict[str, np.ndarray],
) -> None:
    """One embedding shard: arrays in an .npz, keys and captions in a parquet, aligned."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, a in arrays.items():
        if len(a) != len(keys):
            raise ValueError(f"{k} has {len(a)} rows for {len(keys)} keys in shard {name}")
    np.savez(out_dir / f"{name}.npz", **arrays)
    pd.DataFrame({"key": list(keys), "caption": list(captions)}).to_parquet(
        out_dir / f"{name}.parquet", index=False
    )


@dataclass
class Embeddings:
    """All embeddings of a dataset, loaded for training (float32 tensors)."""

    keys: list[str]
    captions: list[str]
    image_embed: torch.Tensor  # (N, E)
    text_embed: torch.Tensor  # (N, E)
    text_tokens: torch.Tensor | None = None  # (N, L, D)
    text_mask: torch.Tensor | None = None  # (N, L)

    def select(self, index: np.ndarray | list[int]) -> Embeddings:
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        pick = [int(i) for i in idx]
        return Embeddings(
            [self.keys[i] for i in pick],
            [self.captions[i] for i in pick],
            self.image_embed[idx],
            self.text_embed[idx],
            None if self.text_tokens is None else self.text_tokens[idx],
            None if self.text_mask is None else self.text_mask[idx],
        )


def load_embeddings(emb_dir: Path) -> Embeddings:
    """Read every embedding shard of a directory."""
    names = sorted(p.stem for p in Path(emb_dir).glob("*.parquet"))
    if not names:
        raise FileNotFoundError(f"no embedding shards in {emb_dir}; run compute_clip_embeddings")
    keys, captions, parts = [], [], {}
    for name in names:
        df = pd.read_parquet(Path(emb_dir) / f"{name}.parquet")
        keys += df["key"].tolist()
        captions += df["caption"].tolist()
        with np.load(Path(emb_dir) / f"{name}.npz") as z:
            for k in z.files:
                parts.setdefault(k, []).append(z[k])
    cat = {k: torch.from_numpy(np.concatenate(v)) for k, v in parts.items()}
    tokens = cat.get("text_tokens")
    return Embeddings(
        keys,
        captions,
        cat["image_embed"].float(),
        cat["text_embed"].float(),
        None if tokens is None else tokens.float(),
        cat.get("text_mask"),
    )


def split_holdout(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of held-out pairs: the same for the same n, fraction and seed."""
    order = np.random.default_rng(seed).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[order[: round(n * fraction)]] = True
    return mask


def unique_caption_batches(
    captions: Sequence[str], batch_size: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Endless batches of indices in which no caption repeats.

    A contrastive loss treats every other pair in the batch as a negative; two pairs with
    the same caption would then push apart what should match. Small captioned datasets
    (shapes64 has 108 captions) are full of such duplicates.
    """
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        groups.setdefault(c, []).append(i)
    members = [np.asarray(v) for v in groups.values()]
    size = min(batch_size, len(members))
    while True:
        order = rng.permutation(len(members))
        for start in range(0, len(order) - size + 1, size):
            yield np.array([rng.choice(members[g]) for g in order[start : start + size]])


def random_batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless shuffled epochs of index batches (the last short batch of an epoch is dropped)."""
    size = min(batch_size, n)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]

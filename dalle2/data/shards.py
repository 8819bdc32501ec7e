"""Streaming readers for img2dataset webdataset shards and the embedding shards made from them.

Layout under a dataset directory (what img2dataset writes, plus our embeddings):
    shards/00000.tar            {key}.png|jpg|webp, {key}.txt, {key}.json
    shards/00000.parquet        img2dataset's per-shard metadata (key, caption, status, ...)
    embeddings/00000.npz        image_embed (N, E) float16, text_embed (N, E) float16,
                                optional text_tokens (N, L, D) float16 + text_mask (N, L)
    embeddings/00000.parquet    key, caption: row i of the npz belongs to sample i of the tar

Nothing here holds a dataset in memory. `ShardStream` reads one shard at a time inside
DataLoader workers (webdataset parses the tars), gives every process and worker its own
shards, mixes samples through a seeded shuffle buffer and collates batches in the worker,
so memory is bounded by shard size, buffer and batch, whatever the dataset's size.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import webdataset as wds
from pydantic import BaseModel
from torch.utils.data import DataLoader, IterableDataset
from webdataset.utils import pytorch_worker_info

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
Split = str  # "train", "holdout", "holdout:{set}" (Holdout.sets) or "all"
INDEX_CACHE_SAMPLES = 500_000  # tar index entries a reader keeps (~100 MB): bounded memory
Sample = dict[str, Any]
Batch = dict[str, Any]
# augmentation of a collated batch; draws its randomness from the generator it is handed
Transform = Callable[[Batch, torch.Generator], Batch]


class DatasetRef(BaseModel):
    """A downloaded, DVC-versioned dataset: what the download step hands on."""

    path: str  # directory of webdataset shards
    md5: str  # from DVC's md5s of the directory's files: names the dataset
    num_samples: int
    num_failed: int = 0


class EmbeddingsRef(BaseModel):
    """Embedding shards computed from a dataset by one CLIP."""

    path: str
    data_md5: str
    clip_id: str
    num_samples: int
    with_tokens: bool = False


class AlignmentError(RuntimeError):
    """An embedding shard does not hold the rows of its image shard, in its order."""


# ----------------------------------------------------------------------------- split


def _hash_below(text: str, fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


@dataclass(frozen=True)
class Holdout:
    """Which pairs are held out of training: the one place the split is decided.

    `by="captions"` withholds a share of the distinct captions (every image of a held-out
    caption is unseen by CLIP, the prior and every unet, so evaluation asks for prompts the
    models never read); `by="pairs"` withholds a share of the pairs, for datasets whose
    captions never repeat. `rules` (data.holdout_rules) hold out further sets, each a
    share of the groups of captions matching a pattern (one skin tone of a set of
    gestures, in every style), measured under their own names. A hash, not a
    permutation: every step, process and worker agrees without a pass over the data, and
    adding shards does not move existing pairs.
    """

    fraction: float = 0.0
    by: Literal["captions", "pairs"] = "captions"
    rules: tuple[Any, ...] = ()  # config.HoldoutRule: name, match, fraction, group_ignore

    @classmethod
    def of(cls, data: Any) -> Holdout:
        """The split a DataConfig names (data.holdout_fraction, data.holdout, holdout_rules)."""
        return cls(data.holdout_fraction, data.holdout, tuple(data.holdout_rules))

    def held_in(self, key: str, caption: str) -> str | None:
        """The held-out set a pair belongs to (a rule's name, or `by`); None: trained on."""
        text = " ".join(caption.split())
        for rule in self.rules:
            if re.search(rule.match, text):
                group = re.sub(rule.group_ignore, "", text) if rule.group_ignore else text
                if _hash_below(f"{rule.name}:{group.casefold()}", rule.fraction):
                    return rule.name
        if self.fraction <= 0:
            return None
        return (
            self.by
            if _hash_below(text.casefold() if self.by == "captions" else key, self.fraction)
            else None
        )

    def held(self, key: str, caption: str) -> bool:
        return self.held_in(key, caption) is not None

    def keeps(self, split: Split, key: str, caption: str) -> bool:
        """Whether a pair belongs to `split`: "train", "holdout" (any held-out set),
        "holdout:{set}" (one of them, see `sets`) or "all"."""
        if split == "all":
            return True
        where = self.held_in(key, caption)
        if split in ("train", "holdout"):
            return (where is None) == (split == "train")
        return where == split.removeprefix("holdout:")

    @property
    def names(self) -> tuple[str, str]:
        """What the held-out and the training pairs are, for metric names."""
        if self.by == "captions":
            return "unseen_captions", "seen_captions"
        return "heldout_pairs", "train_pairs"

    @property
    def sets(self) -> list[tuple[Split, str]]:
        """(split, metric prefix) of every held-out set, then of the training pairs."""
        held, seen = self.names
        if not self.rules:
            return [("holdout", held), ("train", seen)]
        rules: list[tuple[Split, str]] = [
            (f"holdout:{r.name}", f"unseen_{r.name}") for r in self.rules
        ]
        return [(f"holdout:{self.by}", held), *rules, ("train", seen)]


# ----------------------------------------------------------------------------- image shards


def shard_paths(shard_dir: Path) -> list[Path]:
    """The .tar shards of a directory, in a stable order."""
    paths = sorted(Path(shard_dir).glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"no .tar shards in {shard_dir}; run the download step first")
    return paths


def tar_samples(path: Path) -> Iterator[Sample]:
    """Raw samples of one tar in its order: {"__key__", "txt": bytes, "png": bytes, ...}."""
    for sample in wds.tarfile_samples([{"url": str(path)}]):
        if "txt" in sample and any(e in sample for e in IMAGE_EXTS):
            yield sample


TarIndex = list[tuple[str, dict[str, tuple[int, int]]]]  # [(key, {ext: (offset, size)})]


def tar_index(path: Path) -> TarIndex:
    """Where each complete sample's files lie in a tar, in the tar's order.

    Parsing tar headers (img2dataset writes a pax header per file) costs more than decoding
    a small PNG; with an index, later epochs read a shard by seeking instead.
    """
    index: TarIndex = []
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.rpartition(".")
            if not index or index[-1][0] != key:
                index.append((key, {}))
            index[-1][1][ext.lower()] = (m.offset_data, m.size)
    return [e for e in index if "txt" in e[1] and any(x in e[1] for x in IMAGE_EXTS)]


def tar_keys(path: Path) -> list[str]:
    """Keys of a tar's complete samples in order, from the headers alone."""
    return [key for key, _ in tar_index(path)]


def decode_image(sample: dict[str, bytes]) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a raw sample ({ext: bytes}); torchvision's decoders are ~2x
    faster than PIL's on small images, and decoding is most of what streaming costs.
    Imported here, not at the top: torchvision takes seconds to import (torch._dynamo, by
    way of its ops), which a process that streams only embeddings (a prior worker) or
    only reads shard indexes would pay for nothing."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as decode_image_bytes

    data = next(sample[e] for e in IMAGE_EXTS if e in sample)
    chw = decode_image_bytes(
        torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB
    )
    return chw.permute(1, 2, 0).numpy()


def caption_of(sample: Sample) -> str:
    return sample["txt"].decode("utf-8").strip()


def read_captions(shard_dir: Path) -> list[str]:
    """The distinct captions of a dataset, from img2dataset's per-shard parquet metadata."""
    seen: set[str] = set()
    for tar in shard_paths(shard_dir):
        meta = tar.with_suffix(".parquet")
        if meta.is_file():
            df = pd.read_parquet(meta, columns=["caption", "status"])
            seen.update(df.loc[df["status"] == "success", "caption"].astype(str).str.strip())
        else:  # shards written by other tools: read the captions from the tar
            seen.update(caption_of(s) for s in tar_samples(tar))
    return sorted(seen)


# ----------------------------------------------------------------------------- embedding shards


def write_embedding_shard(
    out_dir: Path,
    name: str,
    keys: Sequence[str],
    captions: Sequence[str],
    arrays: dict[str, np.ndarray],
) -> None:
    """One embedding shard: arrays in an .npz, keys and captions in a parquet, aligned.

    Both files are written to temporary names and renamed, the parquet last, so a shard
    whose parquet exists is complete (a crash mid-shard leaves no half shard behind).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, a in arrays.items():
        if len(a) != len(keys):
            raise ValueError(f"{k} has {len(a)} rows for {len(keys)} keys in shard {name}")
    tmp = out_dir / f".{name}.npz.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, out_dir / f"{name}.npz")
    tmp = out_dir / f".{name}.parquet.tmp{os.getpid()}"
    pd.DataFrame({"key": list(keys), "caption": list(captions)}).to_parquet(tmp, index=False)
    os.replace(tmp, out_dir / f"{name}.parquet")


def read_embedding_shard(
    emb_dir: Path, name: str
) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """Keys, captions and arrays of one embedding shard, checked to have one row per key."""
    meta, npz = Path(emb_dir) / f"{name}.parquet", Path(emb_dir) / f"{name}.npz"
    if not (meta.is_file() and npz.is_file()):
        raise AlignmentError(
            f"image shard {name}.tar has no embedding shard in {emb_dir}; "
            "rerun compute_clip_embeddings"
        )
    frame = pd.read_parquet(meta, columns=["key", "caption"])
    keys = frame["key"].tolist()
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    bad = [k for k, a in arrays.items() if len(a) != len(keys)]
    if bad:
        raise AlignmentError(f"embedding shard {name}: {bad} do not have {len(keys)} rows")
    return keys, frame["caption"].tolist(), arrays


def embedding_shard_ok(tar: Path, emb_dir: Path, with_tokens: bool) -> bool:
    """True when `tar` has a complete embedding shard with its keys in its order."""
    try:
        keys, _, arrays = read_embedding_shard(emb_dir, tar.stem)
    except (AlignmentError, OSError, ValueError):
        return False
    needed = {"image_embed", "text_embed"} | (
        {"text_tokens", "text_mask"} if with_tokens else set()
    )
    return needed <= set(arrays) and keys == tar_keys(tar)


def embedding_names(emb_dir: Path) -> list[str]:
    names = sorted(p.stem for p in Path(emb_dir).glob("*.parquet"))
    if not names:
        raise FileNotFoundError(f"no embedding shards in {emb_dir}; run compute_clip_embeddings")
    return names


# ----------------------------------------------------------------------------- streaming


def _collate(samples: list[Sample]) -> Batch:
    """Stack a list of samples into a batch; images are decoded here, in the worker."""
    batch: Batch = {"key": [s["__key__"] for s in samples]}
    batch["caption"] = [s["caption"] for s in samples]
    if "raw" in samples[0]:
        batch["image"] = torch.from_numpy(np.stack([decode_image(s["raw"]) for s in samples]))
    for name in samples[0]:
        if name not in ("__key__", "caption", "raw"):
            batch[name] = torch.from_numpy(np.stack([s[name] for s in samples]))
    return batch


def _batches(samples: Iterator[Sample], size: int, drop_last: bool) -> Iterator[list[Sample]]:
    while chunk := list(itertools.islice(samples, size)):
        if len(chunk) == size or not drop_last:
            yield chunk


def _unique_caption_batches(
    samples: Iterator[Sample], size: int, pool_limit: int, rng: random.Random
) -> Iterator[list[Sample]]:
    """Batches in which no caption repeats, where the stream allows it.

    A contrastive loss treats every other pair of a batch as a negative, so two pairs with
    one caption would push apart what should match (small captioned sets are full of such
    repeats). Samples wait in a pool, grouped by caption, until `size` distinct captions are
    there; past `pool_limit` waiting samples a batch is filled up with repeats instead.
    """
    pool: dict[str, list[Sample]] = {}
    waiting = 0

    def take() -> list[Sample]:
        nonlocal waiting
        captions = rng.sample(sorted(pool), min(size, len(pool)))
        while len(captions) < size:  # fewer distinct captions than the batch: repeat some
            captions.append(rng.choice(sorted(c for c in pool if len(pool[c]) > captions.count(c))))
        batch = [pool[c].pop(0) for c in captions]
        for c in set(captions):
            if not pool[c]:
                del pool[c]
        waiting -= size
        return batch

    for s in samples:
        pool.setdefault(s["caption"], []).append(s)
        waiting += 1
        if len(pool) >= size or waiting >= pool_limit:
            yield take()
    while waiting >= size:
        yield take()


class ShardStream(IterableDataset):
    """Batches of image-caption pairs and/or their CLIP embeddings, streamed from shards.

    Each reader (process x DataLoader worker) takes its own shards of a seeded per-epoch
    shard order; with fewer shards than readers every reader scans all shards and keeps
    every n-th sample. Image samples are checked against their embedding shard by key and
    position as they are read, so a stale or misaligned shard is an error naming it.

    Args:
        shard_dir: img2dataset's tar shards; None streams embedding shards alone (the prior).
        emb_dir: embedding shards to join by key; None streams images and captions alone.
        batch_size: samples per batch of this process (the global batch / processes).
        split: which pairs: "train", "holdout" (see Holdout) or "all".
        text_tokens: also read the per-token text encodings and masks.
        shuffle_buffer: samples mixed per reader; 0 keeps shard order (evaluation).
        epochs: passes over the data; None streams forever (training is step-based).
        unique_captions: batches without repeated captions (contrastive training).
        transform: applied to each collated batch in the worker, with a generator seeded by
            the batch's position (augmentation that a resumed stream repeats exactly).
    """

    def __init__(
        self,
        shard_dir: Path | None,
        emb_dir: Path | None = None,
        *,
        batch_size: int,
        split: Split = "train",
        holdout: Holdout = Holdout(),
        text_tokens: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        epochs: int | None = None,
        unique_captions: bool = False,
        drop_last: bool = True,
        transform: Transform | None = None,
    ) -> None:
        super().__init__()
        if shard_dir is None and emb_dir is None:
            raise ValueError("ShardStream needs image shards, embedding shards or both")
        self.shard_dir = None if shard_dir is None else Path(shard_dir)
        self.emb_dir = None if emb_dir is None else Path(emb_dir)
        self.names = (
            [p.stem for p in shard_paths(self.shard_dir)]
            if self.shard_dir is not None
            else embedding_names(self.emb_dir)
        )
        self.batch_size = batch_size
        self.split = split
        self.holdout = holdout
        self.text_tokens = text_tokens
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epochs = epochs
        self.unique_captions = unique_captions
        self.drop_last = drop_last
        self.transform = transform
        self.start_batch = 0  # see start_at
        self._index: dict[str, TarIndex] = {}  # per reader process, up to INDEX_CACHE_SAMPLES
        self._indexed = 0

    # ------------------------------------------------------------------ one shard

    def _embedding_rows(self, name: str) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
        keys, captions, arrays = read_embedding_shard(self.emb_dir, name)
        wanted = ["image_embed", "text_embed"]
        if self.text_tokens:
            wanted += ["text_tokens", "text_mask"]
        missing = [w for w in wanted if w not in arrays]
        if missing:
            raise AlignmentError(f"embedding shard {name} lacks {missing}")
        return keys, captions, {w: arrays[w] for w in wanted}

    def _tar_index(self, name: str) -> TarIndex:
        index = self._index.get(name)
        if index is None:
            index = tar_index(self.shard_dir / f"{name}.tar")
            if self._indexed + len(index) <= INDEX_CACHE_SAMPLES:
                self._index[name] = index
                self._indexed += len(index)
        return index

    def _read_tar(self, name: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {ext: bytes}) of a shard's image and caption files, through a cached index."""
        with open(self.shard_dir / f"{name}.tar", "rb") as f:
            for key, parts in self._tar_index(name):
                raw = {}
                for ext, (offset, size) in parts.items():
                    if ext == "txt" or ext in IMAGE_EXTS:
                        f.seek(offset)
                        raw[ext] = f.read(size)
                yield key, raw

    def _shard(self, name: str) -> Iterator[Sample]:
        """Samples of one shard, with embeddings joined and checked when there are any."""
        rows: dict[str, np.ndarray] = {}
        keys: list[str] = []
        captions: list[str] = []
        if self.emb_dir is not None:
            keys, captions, rows = self._embedding_rows(name)
        if self.shard_dir is None:
            for i, key in enumerate(keys):
                yield {"__key__": key, "caption": captions[i], **{k: rows[k][i] for k in rows}}
            return
        i = -1
        for i, (key, raw) in enumerate(self._read_tar(name)):
            sample = {"__key__": key, "caption": caption_of(raw), "raw": raw}
            if rows:
                if i >= len(keys) or keys[i] != key:
                    raise AlignmentError(
                        f"shard {name}: sample {i} is key {key} in the tar but "
                        f"{keys[i] if i < len(keys) else 'missing'} in the embedding shard; "
                        "the embeddings are stale, rerun compute_clip_embeddings"
                    )
                sample.update({k: v[i] for k, v in rows.items()})
            yield sample
        if rows and i + 1 != len(keys):
            raise AlignmentError(
                f"shard {name}: {i + 1} samples in the tar but {len(keys)} embedding rows"
            )

    # ------------------------------------------------------------------ the stream

    def _epoch_shards(self, epoch: int, slot: int, readers: int) -> tuple[list[str], int]:
        """This reader's shards in `epoch` and the stride of the samples it keeps of them."""
        names = list(self.names)
        if self.shuffle_buffer > 0:  # the same order in every reader, so the split partitions
            random.Random(f"{self.seed}/{epoch}").shuffle(names)
        if len(names) >= readers:
            return names[slot::readers], 1
        # fewer shards than readers: all read every shard, each keeps its n-th samples
        return names, readers

    def _epoch(self, epoch: int, slot: int, readers: int) -> Iterator[Sample]:
        names, stride = self._epoch_shards(epoch, slot, readers)
        for name in names:
            for i, s in enumerate(self._shard(name)):
                if i % stride == slot % stride and self.holdout.keeps(
                    self.split, s["__key__"], s["caption"]
                ):
                    yield s

    def _shard_rows(self, name: str) -> list[tuple[str, str]]:
        """(key, caption) of a shard's samples in order, without reading its images."""
        if self.emb_dir is not None:  # checked against the tar as the shard is streamed
            meta = pd.read_parquet(self.emb_dir / f"{name}.parquet", columns=["key", "caption"])
            return list(zip(meta["key"], meta["caption"], strict=True))
        rows = []
        with open(self.shard_dir / f"{name}.tar", "rb") as f:
            for key, parts in self._tar_index(name):
                offset, size = parts["txt"]
                f.seek(offset)
                rows.append((key, f.read(size).decode("utf-8").strip()))
        return rows

    def _epoch_batches(self, epoch: int, slot: int, readers: int) -> int:
        """Batches this reader yields in `epoch`: counted from keys, nothing is decoded."""
        names, stride = self._epoch_shards(epoch, slot, readers)
        n = sum(
            1
            for name in names
            for i, (key, caption) in enumerate(self._shard_rows(name))
            if i % stride == slot % stride and self.holdout.keeps(self.split, key, caption)
        )
        return n // self.batch_size

    def _too_small(self, readers: int) -> bool:
        """Whether the readers' average share of an epoch falls short of a batch, so some
        would never fill one (an epoch without a batch is otherwise normal: small shards)."""
        total = sum(
            self.holdout.keeps(self.split, key, caption)
            for name in self.names
            for key, caption in self._shard_rows(name)
        )
        return total < readers * self.batch_size

    def _epoch_chunks(self, epoch: int, slot: int, readers: int) -> Iterator[list[Sample]]:
        """One epoch's batches of samples; the shuffle buffer starts empty every epoch, so an
        epoch's batches depend on nothing before it and a resumed stream can jump to it."""
        samples = self._epoch(epoch, slot, readers)
        rng = random.Random(f"{self.seed}/{slot}/{epoch}")
        if self.shuffle_buffer > 0:
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        if self.unique_captions:
            limit = max(self.shuffle_buffer, 2 * self.batch_size)
            return _unique_caption_batches(samples, self.batch_size, limit, rng)
        return _batches(samples, self.batch_size, self.drop_last)

    def _generator(self, slot: int, position: int) -> torch.Generator:
        """The augmentation RNG of a batch: seeded by its position, so it is the same batch
        whether the stream ran from the start or was resumed past it."""
        digest = hashlib.blake2b(f"{self.seed}/{slot}/{position}".encode(), digest_size=8)
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "big") >> 1)

    def start_at(self, batches: int) -> None:
        """Begin at this process's batch `batches` (a resumed run): whole epochs before it
        are skipped by counting keys, the rest of its epoch by reading without decoding."""
        if batches and not self.drop_last:
            raise ValueError("only a stream that drops partial batches can be resumed")
        self.start_batch = batches

    def __iter__(self) -> Iterator[Batch]:
        rank, world, worker, workers = pytorch_worker_info()
        # The DataLoader takes batches from its workers in turn, starting with worker 0:
        # resumed at global batch n, worker w plays the reader whose turn batch n + w was.
        reader = (worker + self.start_batch) % workers
        slot, readers = rank * workers + reader, world * workers
        skip = (worker + self.start_batch) // workers
        position = 0
        for epoch in itertools.count() if self.epochs is None else range(self.epochs):
            if skip:
                n = self._epoch_batches(epoch, slot, readers)
                if n <= skip and n > 0:
                    skip, position = skip - n, position + n
                    continue
            empty = True
            for chunk in self._epoch_chunks(epoch, slot, readers):
                empty = False
                if skip:
                    skip, position = skip - 1, position + 1
                    continue
                batch = _collate(chunk)
                if self.transform is not None:
                    batch = self.transform(batch, self._generator(slot, position))
                position += 1
                yield batch
            if empty and self.epochs is None and self._too_small(readers):
                raise ValueError(
                    f"reader {slot} of {readers} found fewer than {self.batch_size} "
                    f"{self.split} samples in {self.shard_dir or self.emb_dir}; use fewer "
                    "processes or loader workers, or a smaller batch"
                )


def loader(stream: ShardStream, workers: int, seed: int = 0) -> DataLoader:
    """A DataLoader over a stream's batches: reading, decoding and collating in `workers`.

    It has its own generator: a DataLoader draws its workers' seeds when iterated, and
    drawing them from torch's global RNG would shift the training noise of a resumed run.
    """
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )


def take(stream: ShardStream, n: int) -> Batch:
    """The first `n` samples of a finite stream as one batch (evaluation, read in-process)."""
    parts: list[Batch] = []
    got = 0
    for batch in stream:
        parts.append(batch)
        got += len(batch["key"])
        if got >= n:
            break
    if not parts:
        return {}
    out: Batch = {}
    for name in parts[0]:
        values = [p[name] for p in parts]
        if isinstance(values[0], torch.Tensor):
            out[name] = torch.cat(values)[:n]
        else:
            out[name] = list(itertools.chain.from_iterable(values))[:n]
    return out

"""The streaming reader: coverage across ranks and workers, key alignment, bounded memory."""

from __future__ import annotations

import itertools
import tracemalloc
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_shard_set

from dalle2.clip import build_scratch_clip
from dalle2.config import ClipTowerConfig
from dalle2.data import shards as D
from dalle2.recipes.embeddings import compute_embeddings


def _keys(stream: D.ShardStream, workers: int) -> list[str]:
    return [k for batch in D.loader(stream, workers) for k in batch["key"]]


def _rank_keys(monkeypatch, stream: D.ShardStream, rank: int, world: int, workers: int):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    return _keys(stream, workers)


@pytest.mark.parametrize("shards", [8, 3])  # more shards than readers, and fewer
def test_every_key_once_per_epoch_across_2_ranks_x_2_workers(tmp_path, monkeypatch, shards):
    shard_dir, emb_dir = write_shard_set(tmp_path, shards, 24)
    everything = {f"{n:09d}" for n in range(shards * 24)}
    for split in ("train", "holdout"):
        stream = D.ShardStream(
            shard_dir,
            emb_dir,
            batch_size=4,
            split=split,
            holdout=D.Holdout(0.25, "pairs"),
            shuffle_buffer=16,
            epochs=1,
            drop_last=False,
        )
        per_rank = [_rank_keys(monkeypatch, stream, r, 2, 2) for r in range(2)]
        seen = Counter(per_rank[0] + per_rank[1])
        held = D.Holdout(0.25, "pairs")
        expected = {k for k in everything if held.held(k, "") == (split == "holdout")}
        assert set(seen) == expected and max(seen.values()) == 1, split
        assert all(len(keys) > 0 for keys in per_rank), "a rank read nothing"
    assert 0 < len(expected) < len(everything)


def test_embeddings_stay_with_their_images_through_the_shuffle(tmp_path):
    shard_dir, emb_dir = write_shard_set(tmp_path, 3, 20)
    stream = D.ShardStream(shard_dir, emb_dir, batch_size=7, shuffle_buffer=25, epochs=1)
    batches = list(D.loader(stream, 2))
    keys = [k for b in batches for k in b["key"]]
    assert keys != sorted(keys), "the stream was not shuffled"
    for b in batches:
        n = torch.tensor([int(k) for k in b["key"]])
        assert torch.equal(b["image_embed"][:, 0].long(), n)
        assert torch.equal(b["image"][:, 0, 0, 0].long(), n % 256)
        assert b["caption"] == [f"c{int(k)}" for k in b["key"]]


def test_the_same_seed_streams_the_same_batches(tmp_path):
    shard_dir, emb_dir = write_shard_set(tmp_path, 4, 16)

    def keys(seed: int) -> list[str]:
        stream = D.ShardStream(shard_dir, emb_dir, batch_size=4, shuffle_buffer=20, seed=seed)
        it = iter(D.loader(stream, 2))
        return [k for _ in range(40) for k in next(it)["key"]]  # 2.5 epochs

    assert keys(3) == keys(3)
    assert keys(3) != keys(4)


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        ("swap", r"shard 00001: sample 2 is key .* in the tar but .* in the embedding shard"),
        ("drop_row", r"embedding shard 00001: \['image_embed', 'text_embed'\] do not have"),
        ("extra_key", r"shard 00001: 10 samples in the tar but 11 embedding rows"),
        ("missing", r"image shard 00001.tar has no embedding shard"),
    ],
)
def test_a_tampered_embedding_shard_is_one_error_naming_it(tmp_path, tamper, match):
    shard_dir, emb_dir = write_shard_set(tmp_path, 3, 10)
    meta = emb_dir / "00001.parquet"
    df = pd.read_parquet(meta)
    if tamper == "swap":
        df.loc[[2, 3], "key"] = df.loc[[3, 2], "key"].to_numpy()
    elif tamper == "drop_row":
        df = pd.concat([df, df.tail(1)])
    elif tamper == "extra_key":
        df = pd.concat([df, df.tail(1)])
        with np.load(emb_dir / "00001.npz") as z:
            arrays = {k: np.concatenate([z[k], z[k][-1:]]) for k in z.files}
        np.savez(emb_dir / "00001.npz", **arrays)
    if tamper == "missing":
        meta.unlink()
    else:
        df.to_parquet(meta, index=False)
    stream = D.ShardStream(shard_dir, emb_dir, batch_size=5, shuffle_buffer=0, epochs=1)
    with pytest.raises(D.AlignmentError, match=match):
        list(stream)
    assert not D.embedding_shard_ok(shard_dir / "00001.tar", emb_dir, with_tokens=False)


def test_memory_is_bounded_by_shard_buffer_and_batch_not_by_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "INDEX_CACHE_SAMPLES", 150)  # the tar index cache has a cap too

    def peak(shards: int) -> int:
        shard_dir, emb_dir = write_shard_set(tmp_path / str(shards), shards, 100, size=64)
        stream = D.ShardStream(shard_dir, emb_dir, batch_size=8, shuffle_buffer=32, epochs=1)
        tracemalloc.start()
        n = sum(len(b["key"]) for b in stream)  # in-process: tracemalloc sees every array
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert n == shards * 100 - (shards * 100) % 8
        return top

    small, large = peak(4), peak(16)
    dataset_bytes = 16 * 100 * 64 * 64 * 3  # 19.7 MB of pixels in the large set
    assert large < dataset_bytes / 4, f"peak {large} bytes for a {dataset_bytes}-byte set"
    assert large < 1.3 * small, f"peak grew with the data: {small} -> {large} bytes"


def test_unique_caption_batches_do_not_repeat_a_caption(tmp_path):
    shard_dir, _ = write_shard_set(tmp_path, 4, 60, captions=12)  # each caption 20 times
    # a pool of 200 waiting samples holds every caption; smaller pools may fill up with repeats
    stream = D.ShardStream(shard_dir, batch_size=12, shuffle_buffer=200, unique_captions=True)
    it = iter(D.loader(stream, 1))
    for _ in range(30):
        caps = next(it)["caption"]
        assert len(caps) == 12 and len(set(caps)) == 12, caps


def test_holdout_by_pairs_is_a_stable_share_of_keys():
    keys = [f"{n:09d}" for n in range(20_000)]
    split = D.Holdout(0.05, "pairs")
    held = [k for k in keys if split.held(k, "same caption")]
    assert 0.045 < len(held) / len(keys) < 0.055
    assert held == [k for k in keys if split.held(k, "same caption")]
    assert not any(D.Holdout(0.0, "pairs").held(k, "x") for k in keys)


def test_holdout_by_captions_withholds_every_image_of_a_caption(tmp_path):
    """No caption is in both splits, whatever the key: the models never read a held-out
    caption, so evaluation prompts with text they have not seen."""
    shard_dir, emb_dir = write_shard_set(tmp_path, 4, 50, captions=40)  # 5 images a caption
    split = D.Holdout(0.2, "captions")

    def captions(which: str) -> Counter:
        stream = D.ShardStream(
            shard_dir, emb_dir, batch_size=7, split=which, holdout=split, epochs=1, drop_last=False
        )
        return Counter(c for b in stream for c in b["caption"])

    held, train = captions("holdout"), captions("train")
    assert held and train and not set(held) & set(train)
    assert set(held.values()) == {5} and set(train.values()) == {5}  # whole captions
    assert split.held("k1", "A  Red circle ") == split.held("k2", "a red circle")
    assert 4 <= len(held) <= 14  # about 20% of 40


def test_embedding_step_resumes_shard_by_shard(tmp_path):
    shard_dir, _ = write_shard_set(tmp_path, 3, 10, size=16)
    tower = ClipTowerConfig(
        embed_dim=8, image_size=16, vision_width=16, vision_layers=1, patch_size=8,
        text_width=16, text_layers=1, heads=2, context_length=8,
    )  # fmt: skip
    clip = build_scratch_clip(tower, D.read_captions(shard_dir))
    out = tmp_path / "embeddings"
    cpu = torch.device("cpu")

    def run() -> tuple[int, int]:
        return compute_embeddings(
            clip, shard_dir, out, with_tokens=False, batch_size=4, device=cpu, progress=False
        )

    assert run() == (30, 3)
    first = (out / "00001.npz").read_bytes()
    assert run() == (30, 0), "verified shards were recomputed"
    (out / "00001.parquet").unlink()  # as if the run died while writing shard 1
    assert run() == (30, 1)
    assert (out / "00001.npz").read_bytes() == first
    assert all(D.embedding_shard_ok(t, out, with_tokens=False) for t in D.shard_paths(shard_dir))
    assert not D.embedding_shard_ok(shard_dir / "00000.tar", out, with_tokens=True)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("unique_captions", [False, True])
def test_a_stream_started_at_batch_n_continues_the_uninterrupted_stream(
    tmp_path, workers, unique_captions
):
    shard_dir, emb_dir = write_shard_set(tmp_path, 5, 23, captions=40)

    def flip(batch, rng):  # augmentation drawn from the stream's per-batch generator
        batch["noise"] = torch.rand(len(batch["key"]), generator=rng)
        return batch

    def batches(start: int, n: int) -> list[tuple[list[str], list[float]]]:
        stream = D.ShardStream(
            shard_dir,
            emb_dir,
            batch_size=6,
            holdout=D.Holdout(0.1, "pairs"),
            shuffle_buffer=30,
            seed=3,
            unique_captions=unique_captions,
            transform=flip,
        )
        stream.start_at(start)
        it = iter(D.loader(stream, workers))
        return [(b["key"], b["noise"].tolist()) for b in itertools.islice(it, n)]

    straight = batches(0, 50)  # about 17 batches an epoch: crosses epochs 0 -> 2
    for start in (1, 7, 20, 41):  # within epoch 0, then past whole epochs skipped by counting
        assert batches(start, 50 - start) == straight[start:], start

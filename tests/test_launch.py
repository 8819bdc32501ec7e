"""Data-parallel training through the launcher: real torchrun processes, gloo on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import write_shard_set

from dalle2.config import load_config, parse_config
from dalle2.models import unpack_stage
from dalle2.recipes.launch import train_stage

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


def _tiny_decoder(num_processes: int) -> dict:
    cfg = load_config(TINY).model_dump(mode="json")
    cfg["clip"]["tower"]["embed_dim"] = 4  # the embedding shards' width
    cfg["prior"]["net"]["embed_dim"] = 4
    for s in cfg["decoder"]:
        s["unet"]["image_embed_dim"] = 4
    stage = cfg["decoder"][0]
    stage["diffusion"].update(prediction="x0", loss_weighting="none")  # a loss that falls fast
    stage["train"].update(steps=40, batch_size=8, log_every=5, lr=2e-3, num_processes=num_processes)
    cfg["data"]["loader_workers"] = 1
    return cfg


def _train(tmp_path, num_processes: int) -> tuple[list[tuple[int, float]], object]:
    # tiny.yaml's base unet reads 32-wide caption tokens
    shard_dir, emb_dir = write_shard_set(
        tmp_path / str(num_processes), 8, 24, size=16, token_width=32
    )
    logged: list[tuple[int, float]] = []
    cfg = parse_config(_tiny_decoder(num_processes))
    artifact, result = train_stage(
        "decoder",
        cfg.decoder[0],
        cfg.data,
        {"shard_dir": str(shard_dir), "emb_dir": str(emb_dir), "index": 0},
        device=torch.device("cpu"),
        callback=lambda step, m: logged.append((step, m["loss"])),
        progress=False,
    )
    assert result.steps == 40 and not result.stopped_early
    return logged, artifact


def test_two_process_training_logs_once_and_tracks_one_process(tmp_path):
    one, _ = _train(tmp_path, 1)
    two, artifact = _train(tmp_path, 2)
    # rank 0 alone reports: one record per logged step, none doubled by the second process
    assert [s for s, _ in two] == list(range(5, 41, 5)) == [s for s, _ in one]
    a, b = np.array([v for _, v in one]), np.array([v for _, v in two])
    assert b[-3:].mean() < 0.6 * b[0], f"2-process loss did not fall: {b}"
    # same global batch, same schedule: the curves agree within the noise of tiny batches
    assert abs(b[-4:].mean() - a[-4:].mean()) < 0.35 * a[-4:].mean(), (a, b)
    index, stage = unpack_stage(artifact)  # rank 0 wrote a loadable model
    assert index == 0 and all(torch.isfinite(p).all() for p in stage.parameters())

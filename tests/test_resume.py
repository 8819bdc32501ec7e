"""A training stage killed mid-way resumes from its checkpoint and ends where an
uninterrupted run ends: the same weights, bit for bit; on one process or on two torchrun
processes (gloo on CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import write_shard_set

from dalle2.config import DataConfig, load_config
from dalle2.models import ModelArtifact, unpack_stage
from dalle2.recipes.decoder import RECIPE
from dalle2.recipes.launch import train_stage
from dalle2.recipes.stage import StageInputs
from dalle2.training.trainer import latest_checkpoint

TINY = Path(__file__).parent / "configs" / "tiny.yaml"


def _stage(steps: int = 20, every: int = 5, num_processes: int = 1):
    stage = load_config(TINY).decoder[0].model_copy(deep=True)
    train = stage.train.model_copy(
        update={
            "steps": steps,
            "checkpoint_every": every,
            "log_every": 1,
            "num_processes": num_processes,
        }
    )
    unet = stage.unet.model_copy(update={"image_embed_dim": 4})
    # a loss that falls within 20 steps, so the 2-process curve can be compared
    diffusion = stage.diffusion.model_copy(update={"prediction": "x0", "loss_weighting": "none"})
    train = train.model_copy(update={"lr": 2e-3})
    return stage.model_copy(update={"train": train, "unet": unet, "diffusion": diffusion})


def _train(shards, ckpt: Path | None, callback=None, num_processes: int = 1) -> ModelArtifact:
    shard_dir, emb_dir = shards
    artifact, result = train_stage(
        RECIPE,
        _stage(num_processes=num_processes),
        DataConfig(loader_workers=2, shuffle_buffer=40),
        StageInputs(shard_dir, emb_dir, 0, ckpt),
        device=torch.device("cpu"),
        callback=callback,
        progress=False,
    )
    assert result.final_step == 20
    return artifact


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shard_set(
        tmp_path_factory.mktemp("shards"), 3, 30, size=16, captions=7, token_width=32
    )


class _Run(NamedTuple):
    artifact: ModelArtifact
    losses: list[tuple[int, float]]  # (step, loss) as the callback saw them


def _train_logged(shards, ckpt: Path | None, num_processes: int = 1) -> _Run:
    losses: list[tuple[int, float]] = []

    def log(step: int, metrics: dict) -> None:
        losses.append((step, metrics["loss"]))

    return _Run(_train(shards, ckpt, log, num_processes), losses)


@pytest.fixture(scope="module")
def straight(shards) -> _Run:
    return _train_logged(shards, None)  # no checkpoints at all


class _CrashError(Exception):
    pass


def test_a_crashed_stage_resumes_from_its_checkpoint_to_the_same_weights(
    shards, straight, tmp_path
):
    ckpt = tmp_path / "ckpt"

    def crash_at_12(step, metrics):
        if step == 12:
            raise _CrashError

    with pytest.raises(_CrashError):
        _train(shards, ckpt, crash_at_12)
    latest = latest_checkpoint(ckpt)
    assert latest is not None and latest.name == "step-000000010"
    (ckpt / ".step-000000015.tmp").mkdir()  # a save the crash cut short is never loaded
    steps: list[int] = []
    resumed = _train(shards, ckpt, lambda step, m: steps.append(step))
    assert steps[0] == 11, steps  # continued after step 10, did not start over
    assert resumed.files == straight.artifact.files  # EMA weights and config, byte for byte


def test_sigterm_checkpoints_the_step_it_is_on_then_ends_the_process(shards, straight, tmp_path):
    """A preempted worker (SIGTERM) saves where it is; the rerun completes the same model."""
    ckpt = tmp_path / "ckpt"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_resume import _train
        from pathlib import Path

        def preempt(step, metrics):
            if step == 7:
                os.kill(os.getpid(), signal.SIGTERM)

        _train(({str(shards[0])!r}, {str(shards[1])!r}), Path({str(ckpt)!r}), preempt)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-2000:]
    latest = latest_checkpoint(ckpt)
    assert latest is not None and latest.name == "step-000000008", os.listdir(ckpt)
    assert _train(shards, ckpt).files == straight.artifact.files


def test_two_processes_train_like_one_and_resume_together(shards, straight, tmp_path):
    """Rank 0 alone reports and writes the model, the 2-process curve follows the 1-process
    one, and every rank saves its RNG and stream position, so a rerun on as many ranks
    continues to the same weights."""
    straight2 = _train_logged(shards, tmp_path / "a", num_processes=2)
    # one record per step, none doubled by the second process
    assert [s for s, _ in straight2.losses] == list(range(1, 21)) == [s for s, _ in straight.losses]
    a = np.array([v for _, v in straight.losses])
    b = np.array([v for _, v in straight2.losses])
    assert b[-5:].mean() < 0.6 * b[:5].mean(), f"2-process loss did not fall: {b}"
    # same global batch, same schedule: the curves agree within the noise of tiny batches
    assert abs(b[-10:].mean() - a[-10:].mean()) < 0.35 * a[-10:].mean(), (a, b)
    index, stage = unpack_stage(straight2.artifact)
    assert index == 0 and all(torch.isfinite(p).all() for p in stage.parameters())

    ckpt = tmp_path / "b"

    def crash_at_12(step, metrics):
        if step == 12:
            raise _CrashError

    with pytest.raises(_CrashError):
        _train(shards, ckpt, crash_at_12, num_processes=2)
    assert {p.name for p in latest_checkpoint(ckpt).iterdir()} >= {
        "rng.safetensors",
        "rng_rank1.safetensors",
    }
    assert _train(shards, ckpt, num_processes=2).files == straight2.artifact.files

"""A training stage killed mid-way resumes from its checkpoint and ends where an
uninterrupted run ends: the same weights, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import write_shard_set

from dalle2.config import DataConfig, load_config
from dalle2.models import ModelArtifact
from dalle2.recipes.launch import train_stage
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
    return stage.model_copy(update={"train": train, "unet": unet})


def _train(shards, ckpt: Path | None, callback=None, num_processes: int = 1) -> ModelArtifact:
    shard_dir, emb_dir = shards
    inputs = {"shard_dir": str(shard_dir), "emb_dir": str(emb_dir), "index": 0}
    if ckpt is not None:
        inputs["checkpoint_dir"] = str(ckpt)
    artifact, result = train_stage(
        "decoder",
        _stage(num_processes=num_processes),
        DataConfig(loader_workers=2, shuffle_buffer=40),
        inputs,
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


@pytest.fixture(scope="module")
def straight(shards) -> ModelArtifact:
    return _train(shards, None)  # no checkpoints at all


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
    assert resumed.files == straight.files  # EMA weights and config, byte for byte


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
    assert _train(shards, ckpt).files == straight.files


def test_two_processes_resume_together(shards, tmp_path):
    """Every rank saves its RNG and stream position; a rerun on as many ranks continues."""
    straight2 = _train(shards, tmp_path / "a", num_processes=2)
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
    assert _train(shards, ckpt, num_processes=2).files == straight2.files

"""What every training stage shares: seeds, the data loader and one Trainer wiring."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dalle2.config import DataConfig, TrainConfig
from dalle2.data import shards as D
from dalle2.training.trainer import MetricsCallback, Trainer, TrainResult

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class Run:
    """Where a stage trains (a device, or an accelerator's processes) and where metrics go."""

    device: torch.device
    accelerator: Accelerator | None = None
    callback: MetricsCallback | None = None
    progress: bool = True
    checkpoint_dir: Path | None = None  # resume from here and checkpoint into it

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def world(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; DataLoader workers derive their seeds from torch's."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stream(
    shard_dir: Any,
    emb_dir: Any,
    train: TrainConfig,
    data: DataConfig,
    run: Run,
    **kwargs: Any,
) -> D.ShardStream:
    """The training split, streamed forever; each process reads batch_size / processes."""
    return D.ShardStream(
        shard_dir,
        emb_dir,
        batch_size=train.batch_size // run.world,
        split="train",
        holdout=D.Holdout.of(data),
        shuffle_buffer=data.shuffle_buffer,
        seed=train.seed,
        **kwargs,
    )


def fit(
    model: nn.Module,
    train: TrainConfig,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: D.ShardStream,
    data: DataConfig,
    run: Run,
    desc: str,
) -> tuple[nn.Module, TrainResult]:
    """Train `model` on a stream; returns its EMA copy (what sampling uses) and the result.

    Call after seeding and building the model, so every process starts from the same weights;
    each process then draws its own diffusion noise. With run.checkpoint_dir, a checkpoint
    found there is continued: weights, optimizer, RNG and the stream's position, so the
    result is the one an uninterrupted run gives.
    """
    if run.world > 1:
        torch.manual_seed(train.seed + 1_000_003 * run.rank)
    trainer = Trainer(
        model,
        train,
        loss_fn,
        device=run.device,
        callback=run.callback,
        progress=run.progress,
        desc=desc,
        accelerator=run.accelerator,
    )
    if run.checkpoint_dir is not None:
        batches.start_at(trainer.resume(run.checkpoint_dir) * train.grad_accum)
    loader = D.loader(batches, data.loader_workers, train.seed)
    result = trainer.fit(loader, checkpoint_dir=run.checkpoint_dir)
    return trainer.ema.eval(), result

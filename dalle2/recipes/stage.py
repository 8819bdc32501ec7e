"""What a trainable stage is to the launcher: its config type, how it trains, how its model
becomes files. Each stage module (clip, prior, decoder) exports one `RECIPE`; the launcher
and the steps take it, so nothing outside the config tells stages apart by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from torch import nn

from dalle2.config import DataConfig
from dalle2.models import ModelArtifact
from dalle2.training.fit import Run
from dalle2.training.trainer import TrainResult

S = TypeVar("S", bound=BaseModel)  # the stage's config section
M = TypeVar("M", bound=nn.Module)  # the model it trains


@dataclass(frozen=True)
class StageInputs:
    """Where a stage reads and writes: the image shards, the embedding shards, the decoder
    stage's index and, to resume and checkpoint, a folder every process can reach."""

    shard_dir: Path | None = None
    emb_dir: Path | None = None
    index: int = 0
    checkpoint_dir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            k: None if v is None else str(v) if isinstance(v, Path) else v
            for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StageInputs:
        paths = {
            k: Path(raw[k]) if raw.get(k) else None
            for k in ("shard_dir", "emb_dir", "checkpoint_dir")
        }
        return cls(**paths, index=int(raw.get("index", 0)))


@dataclass(frozen=True)
class Recipe(Generic[S, M]):
    """One trainable stage of unCLIP."""

    name: str  # in logs and job folder names
    config: type[S]  # the config section it trains from
    fit: Callable[[S, DataConfig, StageInputs, Run], tuple[M, TrainResult]]
    pack: Callable[[M, StageInputs], ModelArtifact]

    @property
    def module(self) -> str:
        """The module that exports this recipe as RECIPE: a torchrun worker imports it by
        this name, so a worker of the prior never imports open_clip."""
        return self.fit.__module__

"""What decides whether a step's work can be reused: the code's hash in ZenML's cache keys,
and where a training step checkpoints so that a retry resumes it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dalle2.data.versioning import find_project_root
from dalle2.training.trainer import latest_checkpoint

# Modules no cached step runs (entry points, and what only the uncached register_model
# uses): editing them keeps the caches.
NOT_IN_STEPS = {
    "dalle2/edges/cli.py",
    "dalle2/edges/registry.py",
    "dalle2/edges/runs.py",
    "dalle2/edges/serving.py",
    "dalle2/edges/tracking/reproduce.py",
    "dalle2/edges/tracking/model_card.py",
}


def code_version() -> str:
    """A hash of the dalle2 and steps packages' source: ZenML's cache key sees only a step
    function's own code, so without this a changed library would reuse models the old code
    trained."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for path in sorted([*(root / "dalle2").rglob("*.py"), *(root / "steps").rglob("*.py")]):
        name = path.relative_to(root).as_posix()
        if name not in NOT_IN_STEPS:
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def checkpoint_dir(name: str, **determinants: Any) -> Path:
    """Where a training step checkpoints: `checkpoints/{name}-{hash}` at the project root,
    the hash taken over everything that determines the model (its config section, the data
    settings, the device, the data md5, upstream model ids), so a rerun of the same step
    finds its checkpoint and a changed config never resumes a stale one."""
    plain = {
        k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
        for k, v in determinants.items()
    }
    key = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]
    return find_project_root() / "checkpoints" / f"{name}-{key}"


def latest_step(ckpt: Path) -> int:
    latest = latest_checkpoint(ckpt)
    return int(latest.name.removeprefix("step-")) if latest else 0

"""The git state a run records: which commit its code is, and whether it was edited."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(root: Path, pointer: str = "data.dvc") -> tuple[str, bool]:
    """HEAD, and whether the checkout has uncommitted changes (then HEAD is not the code).

    The data pointer does not count: the pipeline itself rewrites it on every new snapshot,
    and the run records it as `run/<pointer>`, so a fresh clone's first run is not dirty."""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False
    )
    if head.returncode != 0:
        return "unknown", True
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    prefix = subprocess.run(  # porcelain paths are relative to the repository's top
        ["git", "rev-parse", "--show-prefix"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    changed = [line[3:] for line in status.stdout.splitlines() if line[3:] != prefix + pointer]
    return head.stdout.strip(), bool(changed)

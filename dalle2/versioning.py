"""DVC versioning of the data directory, through DVC's own command line.

The data directory is tracked by `<dir>.dvc` at the project root (DVC's convention);
after each download it is added and pushed to the default remote, and its md5 names
the data snapshot in MLflow and ZenML.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml


class VersioningError(RuntimeError):
    """DVC is not set up, or one of its commands failed."""


def find_project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above `start` that holds a `.dvc` folder."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / ".dvc").is_dir():
            return d
    raise VersioningError(
        f"no DVC repository at or above {here}; run `dvc init` there "
        "(the README's Quickstart set-up does this)"
    )


def _dvc(root: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True
    )
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise VersioningError(f"`dvc {' '.join(args)}` failed: {msg[-1] if msg else 'no output'}")
    return proc.stdout


def pointer_md5(root: Path, data_dir: str) -> str | None:
    """The md5 recorded in `<data_dir>.dvc`, or None if there is no pointer file."""
    pointer = root / f"{data_dir}.dvc"
    if not pointer.is_file():
        return None
    outs = (yaml.safe_load(pointer.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def is_in_sync(root: Path, data_dir: str) -> bool:
    """True when the data directory exists and matches its .dvc pointer exactly."""
    if pointer_md5(root, data_dir) is None or not (root / data_dir).is_dir():
        return False
    out = _dvc(root, "status", "--json", f"{data_dir}.dvc")
    return json.loads(out or "{}") == {}


def has_remote(root: Path) -> bool:
    return bool(_dvc(root, "remote", "list").strip())


def add_and_push(root: Path, data_dir: str, push: bool = True) -> str:
    """`dvc add` the data directory (and `dvc push` it when a remote exists); returns md5."""
    _dvc(root, "add", data_dir)
    if push and has_remote(root):
        _dvc(root, "push", f"{data_dir}.dvc")
    md5 = pointer_md5(root, data_dir)
    if md5 is None:
        raise VersioningError(f"dvc add wrote no md5 to {data_dir}.dvc")
    return md5

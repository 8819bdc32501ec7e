"""DVC versioning of the data directory, through DVC's own command line.

The data directory is tracked by `<dir>.dvc` at the project root (DVC's convention) and
holds one folder per data source. After each download it is added and pushed to the
default remote, or to the remote `$DALLE2_DVC_REMOTE` names (the team stack's object store,
`scripts/stack.sh`), so one checkout can run on either stack. A dataset is named by the
md5 of its own folder's files, read from DVC's `.dir` manifest, so adding another source's
folder leaves an existing dataset's md5 alone.

Pipeline runs in one project may run side by side: every DVC command here runs under one
repo-wide lock (`.cache/locks/dvc.lock`), so two runs never meet DVC's own "Unable to
acquire lock" error. The locks are `flock`s, which the OS drops when a process dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

LOCK_DIR = Path(".cache") / "locks"  # under the project root


class VersioningError(RuntimeError):
    """DVC is not set up, or one of its commands failed."""


# Lock files this thread holds. flock conflicts between two open() of one file even in one
# process, so a nested acquire must ride on the held lock rather than wait on itself.
_held = threading.local()


@contextlib.contextmanager
def file_lock(path: Path, why: str, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on `path` while the block runs; yields whether it is held.

    Blocks (logging "waiting for <path> (<why>)" once) unless `wait` is False, when it
    yields False at once if another process or thread holds it. Re-entrant in a thread.
    """
    held: set[str] = _held.__dict__.setdefault("paths", set())
    key = str(path.resolve())
    if key in held:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            logger.info("waiting for %s (%s)", path, why)
            fcntl.flock(f, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield True
        finally:
            held.discard(key)
            fcntl.flock(f, fcntl.LOCK_UN)


def repo_lock(root: Path) -> contextlib.AbstractContextManager[bool]:
    """The project-wide lock every DVC command and every change to the data folder takes."""
    return file_lock(root / LOCK_DIR / "dvc.lock", "another run is using DVC in this project")


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
    with repo_lock(root):
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True
        )
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise VersioningError(f"`dvc {' '.join(args)}` failed: {msg[-1] if msg else 'no output'}")
    return proc.stdout


def _pointer_out(root: Path, data_dir: str) -> dict | None:
    pointer = root / f"{data_dir}.dvc"
    if not pointer.is_file():
        return None
    return ((yaml.safe_load(pointer.read_text()) or {}).get("outs") or [{}])[0]


def pointer_md5(root: Path, data_dir: str) -> str | None:
    """The md5 recorded in `<data_dir>.dvc`, or None if there is no pointer file."""
    out = _pointer_out(root, data_dir)
    return None if out is None else out.get("md5")


def is_in_sync(root: Path, data_dir: str) -> bool:
    """True when the data directory exists and matches its .dvc pointer exactly."""
    if pointer_md5(root, data_dir) is None or not (root / data_dir).is_dir():
        return False
    out = _dvc(root, "status", "--json", f"{data_dir}.dvc")
    return json.loads(out or "{}") == {}


REMOTE_ENV = "DALLE2_DVC_REMOTE"


def _remote(root: Path) -> tuple[str, str] | None:
    """(name, url) of the remote runs push to and pull from: `$DALLE2_DVC_REMOTE`, else DVC's
    default; None without one. One `dvc config --list` (each DVC call costs a second; `dvc
    remote list` wraps long URLs, so its table is not parsed)."""
    config = dict(
        line.partition("=")[::2] for line in _dvc(root, "config", "--list").splitlines()
    )  # every level, later ones last: a dict keeps the one that applies
    urls = {
        key.removeprefix("remote.").removesuffix(".url"): url
        for key, url in config.items()
        if key.startswith("remote.") and key.endswith(".url")
    }
    name = os.environ.get(REMOTE_ENV)
    if name and name not in urls:
        raise VersioningError(
            f"{REMOTE_ENV}={name} names no DVC remote of {root}; add it "
            f"(`scripts/stack.sh up` adds `team`) or unset {REMOTE_ENV}"
        )
    name = name or config.get("core.remote")
    return (name, urls[name]) if name in urls else None


def remote_args(root: Path) -> list[str]:
    """`-r NAME` for the remote `$DALLE2_DVC_REMOTE` names ([] for DVC's default remote)."""
    return ["-r", os.environ[REMOTE_ENV]] if os.environ.get(REMOTE_ENV) and _remote(root) else []


def add(root: Path, data_dir: str) -> str:
    """`dvc add` the data directory; returns the md5 it wrote to `<data_dir>.dvc`."""
    with repo_lock(root):  # the md5 read back must be this add's, not a later run's
        _dvc(root, "add", data_dir)
        md5 = pointer_md5(root, data_dir)
    if md5 is None:
        raise VersioningError(f"dvc add wrote no md5 to {data_dir}.dvc")
    return md5


def push(root: Path, data_dir: str, snapshot: str) -> bool:
    """`dvc push` the snapshot unless this remote already took it; False when the push fails.

    A failed push (object store down) costs the run nothing: the data is in the local cache,
    and the next run pushes it, because only a push that succeeded leaves its marker.
    """
    remote = _remote(root)
    if remote is None:
        return False
    name, url = remote
    where = hashlib.sha256(url.encode()).hexdigest()[:16]
    marker = root / ".cache" / "dvc-pushed" / f"{where}-{snapshot}"
    if marker.is_file():
        return True
    try:
        _dvc(root, "push", "-r", name, f"{data_dir}.dvc")
    except VersioningError as err:
        logger.warning("%s; the snapshot stays in the local cache and the next run pushes it", err)
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def snapshot_files(root: Path, data_dir: str) -> dict[str, str] | None:
    """relpath -> md5 of every file in the snapshot `<data_dir>.dvc` names.

    Read from DVC's `.dir` manifest in the local cache; None when there is no pointer or
    the manifest is not in the cache (e.g. data/ came from somewhere other than `dvc pull`).
    """
    out = _pointer_out(root, data_dir)
    md5 = (out or {}).get("md5") or ""
    if not md5.endswith(".dir"):
        return None
    # DVC 3 keeps its own hashes under files/md5. The cache is content-addressed, so the
    # default cache is looked in first and `dvc cache dir` asked only when it lacks the file.
    name = Path("files", "md5") if out.get("hash") == "md5" else Path()
    name = name / md5[:2] / md5[2:]
    manifest = root / ".dvc" / "cache" / name
    if not manifest.is_file():
        manifest = Path(_dvc(root, "cache", "dir").strip()) / name
    if not manifest.is_file():
        return None
    return {e["relpath"]: e["md5"] for e in json.loads(manifest.read_text())}


def dataset_md5(files: dict[str, str], key: str) -> str | None:
    """The md5 of one dataset folder `<data_dir>/<key>` within a snapshot's files.

    Hashes the sorted (path within the folder, file md5) pairs, so it names the folder's
    content alone: the same bytes give the same md5 whatever else data/ holds. None when
    the snapshot holds no such folder.
    """
    prefix = f"{key}/"
    entries = sorted((p[len(prefix) :], m) for p, m in files.items() if p.startswith(prefix))
    if not entries:
        return None
    return hashlib.md5(json.dumps(entries).encode()).hexdigest()

"""Test isolation: ZenML, MLflow, DVC and torch state live in a temp dir, never the user's.

The suite runs on pytest-xdist workers (pyproject.toml's addopts): each worker imports this
file, so each has its own state dir, and the cores are shared out between the workers' torch
threads (two workers each on every core of a 2-core host run about 6x slower, not 2x).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_STATE = Path(tempfile.mkdtemp(prefix="dalle2-tests-"))
os.environ.update(
    {
        "ZENML_CONFIG_PATH": str(_STATE / "zenml-config"),
        "ZENML_REPOSITORY_PATH": str(_STATE / "zenml-repo"),
        "ZENML_ANALYTICS_OPT_IN": "false",
        "ZENML_ENABLE_RICH_TRACEBACK": "false",
        "ZENML_LOGGING_VERBOSITY": "WARN",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "DVC_SITE_CACHE_DIR": str(_STATE / "dvc-site"),
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "TORCH_HOME": str(_STATE / "torch"),
        "GIT_AUTHOR_NAME": "tests",
        "GIT_AUTHOR_EMAIL": "tests@example.invalid",
        "GIT_COMMITTER_NAME": "tests",
        "GIT_COMMITTER_EMAIL": "tests@example.invalid",
    }
)
os.environ.pop("MLFLOW_TRACKING_URI", None)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # inherited by every subprocess a test starts, torchrun's included
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


_TEAM_FILES = ("test_team_stack", "test_team_pipeline")  # one shared stack: never two at once
# The longest groups (pytest --durations), handed out first so that no worker starts one
# of them when the others are nearly done
_LONGEST_FIRST = ("team_stack", "test_pipeline_e2e", "test_real_preset", "test_emoji")


def _group(path: str) -> str:
    """A test file's xdist work unit: its own, or the team stack's, whose servers some of its
    tests stop and start."""
    stem = Path(path).stem
    return "team_stack" if stem in _TEAM_FILES else stem


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """One worker more than cores (`-n auto`, capped by --maxprocesses): much of the suite
    waits on servers and subprocesses, so a third worker on a 2-core host fills the idle
    core (14:53 against 17:29 with two, 2026-12-02)."""
    return (os.cpu_count() or 1) + 1


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Whole files to a worker, so a module's fixtures (a pipeline run, a server) are built
    once; both team-stack files to the same one. (xdist's own `loadgroup` does not group
    under pytest 9.2: it renames items through an attribute pytest no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid.split("::", 1)[0])

    return ByGroup(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest groups first (a stable sort: each file keeps its own order)."""

    def rank(item: pytest.Item) -> int:
        group = _group(str(item.path))
        return _LONGEST_FIRST.index(group) if group in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)


def register_stack(root: Path, stack: str, tracking_uri: str) -> None:
    """What scripts/setup.sh registers (scripts/register_stack.py), for a project the tests
    build; the ZenML store is the environment's."""
    env = {**os.environ, "ZENML_REPOSITORY_PATH": str(root)}
    script = Path(__file__).resolve().parents[1] / "scripts" / "register_stack.py"
    cmd = [sys.executable, str(script), str(root), stack, tracking_uri]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"registering {stack} failed:\n{proc.stderr[-4000:]}")


def write_shard_set(
    root: Path,
    shards: int,
    per_shard: int,
    *,
    size: int = 8,
    embed_dim: int = 4,
    captions: int = 0,
    token_width: int = 0,
) -> tuple[Path, Path]:
    """Image shards as img2dataset lays them out, plus aligned embedding shards.

    Sample n has key f"{n:09d}", a flat image of grey level n % 256, caption "c{n}" (or
    "c{n % captions}" when captions > 0) and image_embed row [n, n, ...]: any reader that
    mixes rows up shows it. token_width > 0 adds 4 text tokens of that width per sample.
    """
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from dalle2.data.shards import write_embedding_shard

    shard_dir, emb_dir = root / "shards", root / "emb"
    shard_dir.mkdir(parents=True)
    n = 0
    for s in range(shards):
        keys, caps = [], []
        with tarfile.open(shard_dir / f"{s:05d}.tar", "w") as tar:
            for _ in range(per_shard):
                key, cap = f"{n:09d}", f"c{n % captions if captions else n}"
                png = io.BytesIO()
                Image.fromarray(np.full((size, size, 3), n % 256, np.uint8)).save(png, "PNG")
                for ext, blob in (("png", png.getvalue()), ("txt", cap.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
                keys.append(key)
                caps.append(cap)
                n += 1
        rows = np.array([[int(k)] * embed_dim for k in keys], np.float16)
        arrays = {"image_embed": rows, "text_embed": rows}
        if token_width:
            tokens = np.broadcast_to(rows[:, :1, None], (len(keys), 4, token_width))
            arrays |= {"text_tokens": tokens.copy(), "text_mask": np.ones((len(keys), 4), bool)}
        write_embedding_shard(emb_dir, f"{s:05d}", keys, caps, arrays)
    return shard_dir, emb_dir


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    """A DVC project (no git) at tmp_path/proj with a local default remote at tmp_path/remote."""
    root = tmp_path / "proj"
    root.mkdir()
    remote = ("remote", "add", "-q", "-d", "local", str(tmp_path / "remote"))
    for args in (("init", "-q", "--no-scm"), remote):
        subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True
        )
    return root

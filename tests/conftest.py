"""Test isolation: ZenML, MLflow, DVC and torch state live in a temp dir, never the user's."""

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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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

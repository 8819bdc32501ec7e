"""Test isolation: ZenML, MLflow, DVC and torch state live in a temp dir, never the user's."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

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

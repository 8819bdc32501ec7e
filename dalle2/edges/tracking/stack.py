"""The active ZenML stack's MLflow server, checked before any step runs.

On the embedded stack the tracker is a local SQLite file and nothing can go wrong here. On
a shared stack (`scripts/stack.sh`) it is a server behind basic auth: a wrong password or a
server that is down would otherwise surface as a traceback from the first step, after the
download, or worse, after training. One request at compile time turns both into a sentence.
"""

from __future__ import annotations

import base64
import shlex
import urllib.error
import urllib.request
from pathlib import Path

from dalle2.config import ConfigError


def active_tracker(root: Path | None = None):  # -> MLFlowExperimentTracker | None
    """The active stack's experiment tracker (of the ZenML repository at `root`, else the
    current one), or None without one. ZenML is imported here, not at module load."""
    from zenml.client import Client

    return Client(root=root).active_stack.experiment_tracker


def check_tracking_server(timeout: float = 10.0) -> None:
    """Ask the tracker's MLflow server for one experiment with the tracker's credentials
    (resolved from their ZenML secret); ConfigError in one sentence when it refuses."""
    tracker = active_tracker()
    if tracker is None:
        return
    uri = tracker.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    config = tracker.config
    request = urllib.request.Request(
        f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    )
    if config.tracking_username:
        login = f"{config.tracking_username}:{config.tracking_password or ''}"
        request.add_header("Authorization", f"Basic {base64.b64encode(login.encode()).decode()}")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise ConfigError(
                f"the MLflow server at {uri} refused the credentials of experiment tracker "
                f"'{tracker.name}' (HTTP {err.code}); correct the user or password in its "
                "ZenML secret (`zenml secret update mlflow_secret -v`) and run again"
            ) from None
        raise ConfigError(f"the MLflow server at {uri} answered HTTP {err.code}") from None
    except OSError as err:
        why = getattr(err, "reason", err)
        raise ConfigError(
            f"the MLflow server at {uri} does not answer ({why}); start it "
            "(`scripts/stack.sh up`) or switch to a stack whose server runs"
        ) from None


def read_env_file(path: Path) -> dict[str, str]:
    """The `export NAME=value` lines of `scripts/stack.sh`'s env files (values shell-quoted),
    for tools that connect to the team stack without a shell that sourced them."""
    out = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            out[name] = value
    return out

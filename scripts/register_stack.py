"""Register the embedded ZenML stack in one Python process (each `zenml` command takes
seconds to start): `zenml init` in ROOT, an MLflow tracker `mlflow_tracker` at
TRACKING_URI, and the stack STACK with it, made active. Safe to run again.

    python scripts/register_stack.py ROOT STACK TRACKING_URI

scripts/setup.sh runs it with a relative URI (`sqlite:///mlruns.db`), so each checkout keeps
its own ./mlruns.db; the tests run it for the projects they build.
"""

from __future__ import annotations

import sys
from pathlib import Path

from zenml.client import Client
from zenml.enums import StackComponentType as T


def register(root: Path, stack: str, tracking_uri: str) -> None:
    if not Client.is_repository_directory(root):
        Client.initialize(root)
    c = Client()
    tracker = {"tracking_uri": tracking_uri}
    try:
        c.get_stack_component(T.EXPERIMENT_TRACKER, "mlflow_tracker", allow_name_prefix_match=False)
        c.update_stack_component("mlflow_tracker", T.EXPERIMENT_TRACKER, configuration=tracker)
    except KeyError:
        c.create_stack_component("mlflow_tracker", "mlflow", T.EXPERIMENT_TRACKER, tracker)
    try:
        c.get_stack(stack, allow_name_prefix_match=False)
    except KeyError:
        components = {T.ORCHESTRATOR: "default", T.ARTIFACT_STORE: "default"}
        c.create_stack(stack, components={**components, T.EXPERIMENT_TRACKER: "mlflow_tracker"})
    c.activate_stack(stack)


if __name__ == "__main__":
    root, stack, uri = sys.argv[1:]
    register(Path(root).resolve(), stack, uri)

"""What steps log to MLflow: params, metrics, tags and model files.

Steps log through the MLflow run that ZenML's MLflow experiment tracker opens for them
(one run per pipeline run). Without a tracker in the stack there is no active run and
nothing is logged, so steps also run bare through `.entrypoint(...)` in tests.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from zenml import get_step_context, log_metadata

from dalle2.config import UnclipConfig
from dalle2.models import ModelArtifact
from dalle2.training.trainer import MetricsCallback

logger = logging.getLogger("dalle2")


def tracking() -> bool:
    """True when an MLflow run is active (the step runs with the experiment tracker)."""
    return mlflow.active_run() is not None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                out.update(flatten(item, f"{key}.{i}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def log_params(cfg: UnclipConfig) -> None:
    if tracking():
        mlflow.log_params(flatten(json.loads(cfg.model_dump_json())))


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if tracking():
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: dict[str, str]) -> None:
    if tracking():
        mlflow.set_tags(tags)


def metrics_callback(prefix: str) -> MetricsCallback:
    """Training metrics -> MLflow as `{prefix}/loss` etc. at each logged step."""

    def callback(step: int, metrics: dict[str, float]) -> None:
        log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    return callback


def log_model(artifact: ModelArtifact, name: str) -> None:
    """Keep a model's files in the MLflow run under models/{name}."""
    if tracking():
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifacts(str(artifact.to_dir(Path(tmp))), artifact_path=f"models/{name}")


def run_models(
    clip: ModelArtifact, prior: ModelArtifact, unets: list[ModelArtifact]
) -> dict[str, ModelArtifact]:
    """A run's models by their folder under models/: clip, prior, decoder_unet_{index}."""
    return {"clip": clip, "prior": prior, **{f"decoder_unet_{u.config['index']}": u for u in unets}}


def log_missing_models(models: dict[str, ModelArtifact]) -> None:
    """Log each model the MLflow run does not hold whole under models/{name}: a step ZenML
    serves from its cache never runs, so it never logged its model into this run, and
    `dalle2 generate --run` would find a shorter cascade. What a step did log is kept."""
    if not tracking():
        return
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for name, artifact in models.items():
        held = {Path(a.path).name for a in client.list_artifacts(run_id, f"models/{name}")}
        if not {"kind.txt", *artifact.files} <= held:
            log_model(artifact, name)


def mark_training_experiment() -> None:
    """Open the run's experiment on MLflow 3's model-training pages, not its GenAI ones: the
    UI reads the kind from this experiment tag, and guesses GenAI when it is absent.

    MLflow 3.17 and 3.18 still open a fresh browser on the GenAI pages (the sidebar's mode
    lives in the browser's localStorage, mlflow/mlflow#24498), so on a tracking server the
    log also gives the run's link with `workflowType=machine_learning`, which lands on it."""
    run = mlflow.active_run()
    if run is None:
        return
    exp = run.info.experiment_id
    mlflow.MlflowClient().set_experiment_tag(
        exp, "mlflow.experimentKind", "custom_model_development"
    )
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        link = f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run.info.run_id}"
        logger.info("MLflow run (training pages): %s?workflowType=machine_learning", link)


def step_metadata(metadata: dict[str, Any], *, infer_model: bool = False) -> None:
    """ZenML metadata on the running step (or, with infer_model, its model version); nothing
    when the step runs bare through `.entrypoint(...)`, outside a pipeline run."""
    try:
        get_step_context()
    except RuntimeError:
        return
    log_metadata(metadata=metadata, infer_model=infer_model)

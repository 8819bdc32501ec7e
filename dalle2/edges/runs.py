"""Where trained models are found: a folder, an MLflow run (or the latest one), or a
registered model URI (models:/unclip@champion). The core loads folders only (UnCLIP.load);
this edge turns the other sources into one.

    unclip = load_unclip("models:/unclip@champion")
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dalle2.unclip import UnCLIP


class SourceError(ValueError):
    """A model source that does not exist or holds no unCLIP model; one sentence."""


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's own sqlite store (mlruns.db at its root)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from dalle2.data.versioning import VersioningError, find_project_root

    try:
        root = find_project_root()
    except VersioningError:
        root = Path.cwd()
    return f"sqlite:///{root / 'mlruns.db'}"


def find_run(run: str, tracking_uri: str) -> str:
    """Resolve 'latest' (the newest run that holds trained models) or check a run id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if run != "latest":
        try:
            return client.get_run(run).info.run_id
        except MlflowException:
            raise SourceError(f"MLflow run {run} was not found at {tracking_uri}") from None
    experiments = [e.experiment_id for e in client.search_experiments()]
    if experiments:
        for r in client.search_runs(experiments, order_by=["attributes.start_time DESC"]):
            names = {a.path for a in client.list_artifacts(r.info.run_id, "models")}
            if {"models/clip", "models/prior", "models/decoder_unet_0"} <= names:
                return r.info.run_id
    raise SourceError(
        f"no finished pipeline run with trained models at {tracking_uri}; "
        "run the pipeline first or pass --checkpoint"
    )


def check_run_models(run_id: str, tracking_uri: str) -> None:
    """Refuse, before any download, a run whose models/ lacks a model of its config's
    cascade: runs logged before register_model completed the folder hold no model of a step
    ZenML served from its cache, and loaded anyway draw with fewer stages, smaller images.
    The stage count comes from the config download_images logs as params (`decoder.{i}.*`)."""
    import mlflow

    from dalle2.models import check_complete

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    stages = {int(m[1]) for k in run.data.params if (m := re.match(r"decoder\.(\d+)\.", k))}
    held = [Path(a.path).name for a in client.list_artifacts(run_id, "models") if a.is_dir]
    name, version = run.data.tags.get("registry.model"), run.data.tags.get("registry.version")
    hint = (
        f"; its registered model holds them all: pass --model models:/{name}/{version}"
        if name and version
        else "; run the pipeline again, which logs every model into its run"
    )
    where = f"MLflow run {run_id}'s models/"
    check_complete(held, max(stages) + 1 if stages else None, where, hint)


def download_run(run_id: str, tracking_uri: str, dst: Path) -> Path:
    """A run's models/ folder, downloaded under `dst`."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="models", dst_path=str(dst)
    )
    return Path(path)


def download_model(uri: str, tracking_uri: str, dst: Path) -> Path:
    """The model folders inside an MLflow model (models:/unclip@champion, runs:/..., a path)
    logged by the register_model step: its `models` artifact."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from dalle2.edges.serving import MODELS

    mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
        artifacts = Model.load(local).flavors["python_function"].get("artifacts") or {}
    except (MlflowException, OSError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SourceError(
            f"MLflow model {uri} could not be read at {tracking_uri} ({why})"
        ) from None
    if MODELS not in artifacts:
        raise SourceError(f"MLflow model {uri} is not an unCLIP model (no `{MODELS}` artifact)")
    return local / artifacts[MODELS]["path"]


def model_folder(
    dst: Path,
    *,
    checkpoint: str | None = None,
    model: str | None = None,
    run: str | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """The folder of model files that one of `checkpoint` (a folder), `model` (an MLflow
    model URI) or `run` (a run id or 'latest', the default) names; downloads go under `dst`."""
    given = [n for n, v in (("checkpoint", checkpoint), ("model", model), ("run", run)) if v]
    if len(given) > 1:
        raise SourceError(f"give one of --checkpoint, --model or --run, not {given}")
    if checkpoint:
        folder = Path(checkpoint)
        if not folder.is_dir():
            raise SourceError(f"checkpoint directory {folder} does not exist")
        return folder
    uri = tracking_uri or default_tracking_uri()
    if model:
        return download_model(model, uri, dst)
    run_id = find_run(run or "latest", uri)
    check_run_models(run_id, uri)
    return download_run(run_id, uri, dst)


def load_unclip(source: str | Path = "latest", tracking_uri: str | None = None) -> UnCLIP:
    """An UnCLIP from a folder, an MLflow model URI (models:/name@alias, runs:/id/model), a
    run id, or 'latest' (the newest run with trained models)."""
    from dalle2.unclip import UnCLIP

    source = str(source)
    with tempfile.TemporaryDirectory() as tmp:
        if Path(source).is_dir():
            folder = model_folder(Path(tmp), checkpoint=source)
        elif re.match(r"[a-z][a-z0-9+.-]*:/", source):
            folder = model_folder(Path(tmp), model=source, tracking_uri=tracking_uri)
        else:
            folder = model_folder(Path(tmp), run=source, tracking_uri=tracking_uri)
        return UnCLIP.load(folder)

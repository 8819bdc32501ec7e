"""Step 7: the run's models as one MLflow model, registered; the alias follows the metric."""

import base64
import hashlib
import io
import tempfile
from pathlib import Path
from typing import Annotated, Any

import mlflow
import pandas as pd
from PIL import Image
from zenml import ArtifactConfig, step

from dalle2.data.shards import DatasetRef
from dalle2.edges.registry import evaluation_set, register
from dalle2.edges.serving import EXAMPLE_PROMPT, log_unclip_model
from dalle2.edges.tracking.model_card import model_card
from dalle2.models import ModelArtifact, model_names
from steps._tracking import (
    log_metrics,
    log_missing_models,
    logger,
    run_models,
    set_tags,
    step_metadata,
    tracking,
)
from steps._train import load


def models_id(clip: ModelArtifact, prior: ModelArtifact, unets: list[ModelArtifact]) -> str:
    """One id for the whole system: equal files, equal id (a cached rerun registers nothing new)."""
    h = hashlib.sha256()
    for art in (clip, prior, *sorted(unets, key=lambda a: a.config["index"])):
        h.update(art.content_id().encode())
    return h.hexdigest()


def _check_served(model_uri: str) -> None:
    """The logged model, loaded back as a user gets it, draws one picture (a gate before
    the registry: a model that cannot load or sample never becomes a version)."""
    out = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"prompt": [EXAMPLE_PROMPT]}))
    Image.open(io.BytesIO(base64.b64decode(out["image"][0]))).verify()


@step(enable_cache=False)
def register_model(
    config: dict[str, Any],
    dataset: DatasetRef,
    clip: ModelArtifact,
    prior: ModelArtifact,
    decoder_unets: list[ModelArtifact],
    metrics: dict[str, float],
) -> Annotated[str, ArtifactConfig(name="registered_model_uri")]:
    """Log CLIP, prior and cascade as one pyfunc model on this run with a model card, register
    it under `registry.name` and move `registry.alias` to it when its `registry.metric` beats
    the holder's. Never cached: every run's MLflow run gets its model and card, and under
    models/ every model a cached training step did not log, even when all the training came
    from ZenML's cache (a version with the same files is then reused, not registered twice).
    Gets the whole config because the card summarises all of it."""
    cfg, _ = load(config)
    reg = cfg.registry
    if not tracking():
        logger.warning("register_model: no MLflow run (no experiment tracker), nothing registered")
        return ""
    run_id = mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    measured = run.data.metrics
    env = {k: v for k, v in run.data.tags.items() if k.startswith("env.")}
    names = model_names(num_stages=len(cfg.decoder))
    trained = {n: int(measured[f"{n}/steps"]) for n in names if f"{n}/steps" in measured}
    card = model_card(cfg, dataset, metrics, trained, run_id, env)
    models = run_models(clip, prior, decoder_unets)
    log_missing_models(models)  # those of training steps served from ZenML's cache
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "models"
        for name, artifact in models.items():
            artifact.to_dir(folder / name)
        card_file = Path(tmp) / "model_card.md"
        card_file.write_text(card)
        mlflow.log_artifact(str(card_file))
        info = log_unclip_model(folder, card_file)
    mlflow.set_tag("mlflow.note.content", card)  # the run's description in the UI
    _check_served(info.model_uri)
    decision = register(
        info.model_uri,
        models_id(clip, prior, decoder_unets),
        metrics.get(reg.metric),
        name=reg.name,
        metric=reg.metric,
        greater_is_better=reg.greater_is_better,
        alias=reg.alias,
        eval_set=evaluation_set(cfg, dataset.md5),
    )
    if decision.registered:
        client.update_model_version(reg.name, decision.version, description=card)
    logger.info("registered %s version %s: %s", reg.name, decision.version, decision.reason)
    uri = f"models:/{reg.name}/{decision.version}"
    summary = {
        "registry.model": reg.name,
        "registry.version": decision.version,
        "registry.metric": reg.metric,
        "registry.promoted": str(decision.promoted),
        "registry.decision": decision.reason,
    }
    set_tags(summary)
    values = {"registry/candidate": decision.value, "registry/champion": decision.champion_value}
    log_metrics({k: v for k, v in values.items() if v is not None})
    log_metrics({"registry/promoted": float(decision.promoted)})
    metadata = {
        **summary,
        "registry.candidate_value": decision.value,
        "registry.champion_version": decision.champion_version,
        "registry.champion_value": decision.champion_value,
        "mlflow_model_uri": info.model_uri,
        "mlflow_run_id": run_id,
    }
    metadata = {k: v for k, v in metadata.items() if v is not None}
    step_metadata(metadata)
    step_metadata(metadata, infer_model=True)  # on the ZenML model version too
    return uri

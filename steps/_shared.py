"""What every step needs: the validated config, the device, and MLflow logging.

Steps log through the MLflow run that ZenML's MLflow experiment tracker opens for them
(one run per pipeline run). Without a tracker in the stack there is no active run and
nothing is logged, so steps also run bare through `.entrypoint(...)` in tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import torch
from pydantic import BaseModel
from zenml.config.retry_config import StepRetryConfig

from dalle2.config import UnclipConfig, parse_config
from dalle2.data.versioning import find_project_root
from dalle2.device import pick_device
from dalle2.models import ModelArtifact
from dalle2.recipes.launch import Section, Stage, train_stage
from dalle2.training.trainer import MetricsCallback, latest_checkpoint

logger = logging.getLogger("dalle2")


def latest_step(ckpt: Path) -> int:
    latest = latest_checkpoint(ckpt)
    return int(latest.name.removeprefix("step-")) if latest else 0


def load(config: dict[str, Any]) -> tuple[UnclipConfig, torch.device]:
    cfg = parse_config(config)
    return cfg, pick_device(cfg.device)


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


def git_commit(root: Path, pointer: str = "data.dvc") -> tuple[str, bool]:
    """HEAD, and whether the checkout has uncommitted changes (then HEAD is not the code).

    The data pointer does not count: the pipeline itself rewrites it on every new snapshot,
    and the run records it as `run/<pointer>`, so a fresh clone's first run is not dirty."""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False
    )
    if head.returncode != 0:
        return "unknown", True
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    prefix = subprocess.run(  # porcelain paths are relative to the repository's top
        ["git", "rev-parse", "--show-prefix"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    changed = [line[3:] for line in status.stdout.splitlines() if line[3:] != prefix + pointer]
    return head.stdout.strip(), bool(changed)


# A failed training step is tried again by ZenML, and resumes from its last checkpoint.
TRAIN_RETRY = StepRetryConfig(max_retries=2, delay=10, backoff=2)


# Modules no cached step runs (entry points, and what only the uncached register_model
# uses): editing them keeps the caches.
NOT_IN_STEPS = {
    "dalle2/cli.py",
    "dalle2/serving.py",
    "dalle2/tracking/reproduce.py",
    "dalle2/tracking/model_card.py",
}


def code_version() -> str:
    """A hash of the dalle2 and steps packages' source: ZenML's cache key sees only a step
    function's own code, so without this a changed library would reuse models the old code
    trained."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for path in sorted([*(root / "dalle2").rglob("*.py"), *(root / "steps").rglob("*.py")]):
        name = path.relative_to(root).as_posix()
        if name not in NOT_IN_STEPS:
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def checkpoint_dir(name: str, **determinants: Any) -> Path:
    """Where a training step checkpoints: `checkpoints/{name}-{hash}` at the project root,
    the hash taken over everything that determines the model (its config section, the data
    settings, the device, the data md5, upstream model ids), so a rerun of the same step
    finds its checkpoint and a changed config never resumes a stale one."""
    plain = {
        k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
        for k, v in determinants.items()
    }
    key = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]
    return find_project_root() / "checkpoints" / f"{name}-{key}"


def train(
    name: str,
    stage: Stage,
    section: Section,
    data: Any,
    inputs: dict[str, Any],
    device: str,
    progress: bool,
    **upstream: Any,
) -> ModelArtifact:
    """Train one model as a step: resume its checkpoint if a crashed attempt left one, log
    to MLflow, and drop the checkpoint once the model is kept (ZenML's cache has it then)."""
    ckpt = checkpoint_dir(name, section=section, data=data, device=device, **upstream)
    resumed = latest_step(ckpt)
    if resumed:
        logger.info("%s resumes from step %d (checkpoint %s)", name, resumed, ckpt)
    t0 = time.perf_counter()
    artifact, result = train_stage(
        stage,
        section,
        data,
        {**inputs, "checkpoint_dir": str(ckpt)},
        device=pick_device(device),
        callback=metrics_callback(name),
        progress=progress,
    )
    log_metrics(
        {
            f"{name}/final_loss": result.final_loss,
            f"{name}/samples_per_s": result.samples_per_s,
            # where a clock-capped run stopped: pin train.steps to it to reproduce the run
            f"{name}/steps": result.final_step,
            f"{name}/resumed_from_step": result.resumed_from,
            f"time/train_{name}_s": time.perf_counter() - t0,
        }
    )
    log_model(artifact, name)
    shutil.rmtree(ckpt, ignore_errors=True)
    return artifact


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

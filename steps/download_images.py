"""Step 1: img2dataset downloads the URL list into shards; DVC versions them."""

import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import mlflow
import yaml
from zenml import ArtifactConfig, step

from dalle2.data.download import prepare_dataset
from dalle2.data.shards import DatasetRef
from dalle2.data.versioning import find_project_root, pointer_md5, repo_lock
from dalle2.edges.tracking import environment, ghosts
from steps._git import git_commit
from steps._tracking import (
    log_metrics,
    log_params,
    logger,
    mark_training_experiment,
    set_tags,
    step_metadata,
    tracking,
)
from steps._train import load


@step(enable_cache=False)
def download_images(
    config: dict[str, Any],
) -> Annotated[DatasetRef, ArtifactConfig(name="dataset")]:
    """Download (or reuse) this source's shards, and record the run's config and data snapshot.

    Never cached: it is cheap when the data is there, and the md5 it hands on is what tells
    the later steps' caches whether the data changed. It gets the whole config so that the
    MLflow run records it (params, and config.yaml + the data pointer to reproduce the run).
    """
    cfg, device = load(config)
    ghosts.record_and_reap()  # before anything slow: a run killed from here on is found
    t0 = time.perf_counter()
    root = find_project_root()
    ds = prepare_dataset(cfg.data, root, progress=cfg.progress)
    stats = ds.stats
    failed = stats.count - stats.successes
    logger.info(
        "dataset %s at %s: %d of %d images (%d failed: %s)",
        ds.md5,
        ds.path,
        stats.successes,
        stats.count,
        failed,
        stats.reasons or "none",
    )
    pointer = root / f"{cfg.data.data_dir}.dvc"
    with repo_lock(root):  # a run beside this one may add its own dataset meanwhile
        pointer_text = pointer.read_bytes()
        snapshot = pointer_md5(root, cfg.data.data_dir) or ds.snapshot_md5
    log_params(cfg)
    mark_training_experiment()
    commit, dirty = git_commit(root, pointer.name)
    env = environment.current(root, device)
    set_tags(
        {
            "data_md5": ds.md5,
            "data_snapshot_md5": snapshot,
            "git_commit": commit,
            "git_dirty": str(dirty),
            "download_skipped": str(ds.skipped),
            **env.tags(),
        }
    )
    if tracking():  # what `dalle2 reproduce RUN_ID` reads back
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.yaml").write_text(
                yaml.safe_dump({"parameters": {"config": cfg.model_dump(mode="json")}})
            )
            (Path(tmp) / pointer.name).write_bytes(pointer_text)
            (Path(tmp) / Path(environment.ARTIFACT).name).write_text(env.freeze())
            mlflow.log_artifacts(tmp, artifact_path="run")
    log_metrics(
        {
            "data/count": stats.count,
            "data/successes": stats.successes,
            "data/failed_to_download": stats.failed_to_download,
            "data/failed_to_resize": stats.failed_to_resize,
            "time/download_images_s": time.perf_counter() - t0,
        }
    )
    step_metadata(
        {
            "data_md5": ds.md5,
            "data_snapshot_md5": snapshot,
            "num_samples": stats.successes,
            "failed": failed,
            "failure_reasons": stats.reasons,
            "download_skipped": ds.skipped,
        }
    )
    return DatasetRef(path=str(ds.path), md5=ds.md5, num_samples=stats.successes, num_failed=failed)

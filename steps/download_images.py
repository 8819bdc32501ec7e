"""Step 1: img2dataset downloads the URL list into shards; DVC versions them."""

import time
from typing import Annotated, Any

from zenml import ArtifactConfig, log_metadata, step

from dalle2.data import DatasetRef
from dalle2.download import download_dataset, matches_source, read_stats
from dalle2.versioning import add_and_push, find_project_root, is_in_sync, pointer_md5
from steps._shared import git_commit, load, log_metrics, log_params, logger, set_tags


@step(enable_cache=False)
def download_images(
    config: dict[str, Any],
) -> Annotated[DatasetRef, ArtifactConfig(name="dataset")]:
    """Download (or, when data/ already matches data.dvc, reuse) the image-caption shards."""
    cfg, _ = load(config)
    t0 = time.perf_counter()
    root = find_project_root()
    data_dir = root / cfg.data.data_dir
    skipped = is_in_sync(root, cfg.data.data_dir) and matches_source(data_dir, cfg.data)
    if skipped:
        logger.info("%s matches %s.dvc: download skipped", data_dir, cfg.data.data_dir)
        stats = read_stats(data_dir)
        md5 = pointer_md5(root, cfg.data.data_dir)
    else:
        stats = download_dataset(cfg.data, data_dir, root / ".cache", progress=cfg.progress)
        md5 = add_and_push(root, cfg.data.data_dir, push=cfg.data.dvc_push)
    assert md5 is not None
    failed = stats.count - stats.successes
    logger.info(
        "dataset %s: %d of %d images (%d failed: %s)",
        md5,
        stats.successes,
        stats.count,
        failed,
        stats.reasons or "none",
    )
    log_params(cfg)
    set_tags({"data_md5": md5, "git_commit": git_commit(root), "download_skipped": str(skipped)})
    log_metrics(
        {
            "data/count": stats.count,
            "data/successes": stats.successes,
            "data/failed_to_download": stats.failed_to_download,
            "data/failed_to_resize": stats.failed_to_resize,
            "time/download_images_s": time.perf_counter() - t0,
        }
    )
    log_metadata(
        metadata={
            "data_md5": md5,
            "num_samples": stats.successes,
            "failed": failed,
            "failure_reasons": stats.reasons,
            "download_skipped": skipped,
        }
    )
    return DatasetRef(
        path=str(data_dir),
        md5=md5,
        num_samples=stats.successes,
        num_failed=failed,
        skipped_download=skipped,
    )

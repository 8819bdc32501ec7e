"""Step 3: CLIP image and text embeddings for every pair, shard by shard."""

import time
from pathlib import Path
from typing import Annotated

from zenml import ArtifactConfig, step

from dalle2.data.shards import DatasetRef, EmbeddingsRef
from dalle2.data.versioning import find_project_root
from dalle2.device import pick_device
from dalle2.models import ModelArtifact, unpack_clip
from dalle2.recipes.embeddings import compute_embeddings
from steps._tracking import log_metrics, logger


@step
def compute_clip_embeddings(
    dataset: DatasetRef,
    clip: ModelArtifact,
    batch_size: int,
    with_tokens: bool,
    device: str = "auto",
    progress: bool = True,
) -> Annotated[EmbeddingsRef, ArtifactConfig(name="embeddings")]:
    """Embeddings are keyed by (data md5, CLIP id, tokens); finished shards are reused."""
    t0 = time.perf_counter()
    cid = clip.content_id()[:16]
    out = find_project_root() / ".cache" / "embeddings" / f"{dataset.md5}-{cid}-{int(with_tokens)}"
    n, computed = compute_embeddings(
        unpack_clip(clip),
        Path(dataset.path),
        out,
        with_tokens=with_tokens,
        batch_size=batch_size,
        device=pick_device(device),
        progress=progress,
    )
    logger.info("embeddings at %s: %d shards computed, the rest verified and reused", out, computed)
    log_metrics({"time/compute_clip_embeddings_s": time.perf_counter() - t0})
    return EmbeddingsRef(
        path=str(out), data_md5=dataset.md5, clip_id=cid, num_samples=n, with_tokens=with_tokens
    )

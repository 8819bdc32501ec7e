"""Step 3: CLIP image and text embeddings for every pair, shard by shard."""

import hashlib
import time
from pathlib import Path
from typing import Annotated, Any

from zenml import ArtifactConfig, step

from dalle2.data import DatasetRef, EmbeddingsRef
from dalle2.models import ModelArtifact, unpack_clip
from dalle2.recipes.embeddings import compute_embeddings
from dalle2.versioning import find_project_root
from steps._shared import load, log_metrics, logger


def clip_id(artifact: ModelArtifact) -> str:
    h = hashlib.sha256()
    for name in sorted(artifact.files):
        h.update(name.encode() + artifact.files[name])
    return h.hexdigest()[:16]


@step(enable_cache=False)
def compute_clip_embeddings(
    config: dict[str, Any], dataset: DatasetRef, clip: ModelArtifact
) -> Annotated[EmbeddingsRef, ArtifactConfig(name="embeddings")]:
    """Embeddings are keyed by (data md5, CLIP id, tokens); finished shards are reused."""
    cfg, device = load(config)
    t0 = time.perf_counter()
    cid = clip_id(clip)
    with_tokens = cfg.prior.use_text_tokens
    out = find_project_root() / ".cache" / "embeddings" / f"{dataset.md5}-{cid}-{int(with_tokens)}"
    n, computed = compute_embeddings(
        unpack_clip(clip),
        Path(dataset.path),
        out,
        with_tokens=with_tokens,
        batch_size=cfg.clip.embed_batch_size,
        device=device,
        progress=cfg.progress,
    )
    logger.info("embeddings at %s: %d shards computed, the rest verified and reused", out, computed)
    log_metrics({"time/compute_clip_embeddings_s": time.perf_counter() - t0})
    return EmbeddingsRef(
        path=str(out), data_md5=dataset.md5, clip_id=cid, num_samples=n, with_tokens=with_tokens
    )

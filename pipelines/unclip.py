"""The unCLIP training pipeline."""

import sys
from typing import Any

from zenml import Model, pipeline
from zenml.config import CachePolicy

from dalle2.config import ConfigError, parse_config
from dalle2.edges.tracking.stack import check_tracking_server
from dalle2.preflight import check_resources
from steps import (
    compute_clip_embeddings,
    download_images,
    evaluate,
    load_pretrained_clip,
    register_model,
    train_clip,
    train_decoder_unet,
    train_prior,
)

# Each step's cache key: its own config section (parameters), its inputs' contents (data md5,
# model hashes) and the source of the dalle2 package, which ZenML does not see by itself.
CACHE = CachePolicy(cache_func="steps._cache.code_version")


# Every run is a version of this ZenML model, which links the run's artifacts (data refs,
# models, metrics): `zenml model version list unclip`. MLflow's registry holds the servable one.
MODEL = Model(name="unclip", description="unCLIP text-to-image: CLIP, prior, decoder cascade")


@pipeline(enable_cache=True, cache_policy=CACHE, model=MODEL)
def unclip_pipeline(config: dict[str, Any]) -> None:
    """download_images -> train_clip (or load_pretrained_clip) -> compute_clip_embeddings
    -> train_prior -> train_decoder_unet_{i} for each stage -> evaluate -> register_model."""
    try:  # fail at compile time, before any step runs
        cfg = parse_config(config)
        check_resources(cfg)
        check_tracking_server()
    except ConfigError as err:
        # The user-facing edge: one sentence and exit code 2 (a usage error), no traceback.
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    run = {"device": cfg.device, "progress": cfg.progress}
    dataset = download_images(config)
    if cfg.clip.pretrained_model is None:
        clip = train_clip(cfg.clip, cfg.data, dataset, **run)
    else:
        clip = load_pretrained_clip(cfg.clip, after="download_images")
    embeddings = compute_clip_embeddings(
        dataset, clip, cfg.clip.embed_batch_size, cfg.reads_text_tokens, **run
    )
    prior = train_prior(cfg.prior, cfg.data, embeddings, **run)
    unets = [
        train_decoder_unet(
            stage, i, cfg.data, dataset, embeddings, **run, id=f"train_decoder_unet_{i}"
        )
        for i, stage in enumerate(cfg.decoder)
    ]
    metrics = evaluate(config, dataset, embeddings, clip, prior, unets)
    register_model(config, dataset, clip, prior, unets, metrics)

"""The unCLIP training pipeline."""

from typing import Any

from zenml import pipeline

from dalle2.config import ConfigError, parse_config
from steps import (
    compute_clip_embeddings,
    download_images,
    evaluate,
    load_pretrained_clip,
    train_clip,
    train_decoder_unet,
    train_prior,
)


@pipeline(enable_cache=False)
def unclip_pipeline(config: dict[str, Any]) -> None:
    """download_images -> train_clip (or load_pretrained_clip) -> compute_clip_embeddings
    -> train_prior -> train_decoder_unet_{i} for each stage -> evaluate."""
    try:
        cfg = parse_config(config)  # fail at compile time, before any step runs
    except ConfigError as err:
        # The user-facing edge: one sentence and exit code 1, not a traceback.
        raise SystemExit(f"error: {err}") from None
    dataset = download_images(config)
    if cfg.clip.pretrained_model is None:
        clip = train_clip(config, dataset)
    else:
        clip = load_pretrained_clip(config, after="download_images")
    embeddings = compute_clip_embeddings(config, dataset, clip)
    prior = train_prior(config, embeddings)
    unets = [
        train_decoder_unet(config, dataset, embeddings, stage=i, id=f"train_decoder_unet_{i}")
        for i in range(len(cfg.decoder))
    ]
    evaluate(config, dataset, embeddings, clip, prior, unets)

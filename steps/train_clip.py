"""Step 2: train a small CLIP on the pairs (only when no pretrained CLIP is configured)."""

import math
from pathlib import Path
from typing import Annotated

from zenml import ArtifactConfig, step

from dalle2.config import ClipConfig, DataConfig
from dalle2.data.shards import DatasetRef, Holdout
from dalle2.device import pick_device
from dalle2.models import ModelArtifact, pack_clip, unpack_clip
from dalle2.recipes.stage import StageInputs
from steps._tracking import log_metrics, log_model
from steps._train import TRAIN_RETRY, train


@step(retry=TRAIN_RETRY)
def train_clip(
    clip: ClipConfig,
    data: DataConfig,
    dataset: DatasetRef,
    device: str = "auto",
    progress: bool = True,
) -> Annotated[ModelArtifact, ArtifactConfig(name="clip")]:
    """DALL-E 2's first stage, here from scratch with open_clip's model and loss."""
    from dalle2.recipes.clip import RECIPE, retrieval_accuracy  # open_clip: not at compile

    inputs = StageInputs(shard_dir=Path(dataset.path))
    artifact = train("clip", RECIPE, clip, data, inputs, device, progress, data_md5=dataset.md5)
    model = unpack_clip(artifact).to(pick_device(device))
    acc = retrieval_accuracy(model, dataset.path, data)
    if not math.isnan(acc):
        held, _ = Holdout.of(data).names
        log_metrics({f"clip/retrieval_acc_{held}": acc})
    return artifact


@step
def load_pretrained_clip(clip: ClipConfig) -> Annotated[ModelArtifact, ArtifactConfig(name="clip")]:
    """Reference the configured pretrained open_clip model (checks that it loads)."""
    from dalle2.recipes.clip import load_clip_for

    artifact = pack_clip(load_clip_for(clip))
    log_model(artifact, "clip")
    return artifact

"""Step 5: one decoder unet; reused as train_decoder_unet_{i} for every stage."""

from pathlib import Path
from typing import Annotated

from zenml import ArtifactConfig, step

from dalle2.config import DataConfig, DecoderStageConfig
from dalle2.data.shards import DatasetRef, EmbeddingsRef
from dalle2.models import ModelArtifact
from dalle2.recipes.decoder import RECIPE
from dalle2.recipes.stage import StageInputs
from steps._train import TRAIN_RETRY, train


@step(retry=TRAIN_RETRY)
def train_decoder_unet(
    stage_config: DecoderStageConfig,
    index: int,
    data: DataConfig,
    dataset: DatasetRef,
    embeddings: EmbeddingsRef,
    device: str = "auto",
    progress: bool = True,
) -> Annotated[ModelArtifact, ArtifactConfig(name="decoder_unet")]:
    """Stages are independent models: each one could train on its own machine, and each
    step's cache key holds its own stage's settings only."""
    inputs = StageInputs(Path(dataset.path), Path(embeddings.path), index)
    return train(
        f"decoder_unet_{index}",
        RECIPE,
        stage_config,
        data,
        inputs,
        device,
        progress,
        index=index,
        data_md5=dataset.md5,
        embeddings=embeddings.model_dump(mode="json", exclude={"path"}),
    )

"""Step 4: the diffusion prior, text embedding -> image embedding."""

from pathlib import Path
from typing import Annotated

from zenml import ArtifactConfig, step

from dalle2.config import DataConfig, PriorConfig
from dalle2.data.shards import EmbeddingsRef
from dalle2.models import ModelArtifact
from dalle2.recipes.prior import RECIPE
from dalle2.recipes.stage import StageInputs
from steps._train import TRAIN_RETRY, train


@step(retry=TRAIN_RETRY)
def train_prior(
    prior: PriorConfig,
    data: DataConfig,
    embeddings: EmbeddingsRef,
    device: str = "auto",
    progress: bool = True,
) -> Annotated[ModelArtifact, ArtifactConfig(name="prior")]:
    """Reads embedding shards only: the prior never needs an image."""
    return train(
        "prior",
        RECIPE,
        prior,
        data,
        StageInputs(emb_dir=Path(embeddings.path)),
        device,
        progress,
        embeddings=embeddings.model_dump(mode="json", exclude={"path"}),
    )

"""Step 4: the diffusion prior, text embedding -> image embedding."""

from typing import Annotated

from zenml import ArtifactConfig, step

from dalle2.config import DataConfig, PriorConfig
from dalle2.data.shards import EmbeddingsRef
from dalle2.models import ModelArtifact
from steps._shared import TRAIN_RETRY, train


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
        "prior",
        prior,
        data,
        {"emb_dir": embeddings.path},
        device,
        progress,
        embeddings=embeddings.model_dump(mode="json", exclude={"path"}),
    )

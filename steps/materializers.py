"""ZenML materializer for trained models: safetensors + JSON files, never pickles."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from zenml.enums import ArtifactType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer

from dalle2.models import ModelArtifact


class ModelArtifactMaterializer(BaseMaterializer):
    """Stores a ModelArtifact's files as they are in the artifact store."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (ModelArtifact,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def load(self, data_type: type[Any]) -> ModelArtifact:
        with fileio.open(os.path.join(self.uri, "kind.txt"), "r") as f:
            kind = f.read().strip()
        files = {}
        for name in sorted(fileio.listdir(self.uri)):
            name = str(name)
            if name.endswith((".json", ".safetensors")):
                with fileio.open(os.path.join(self.uri, name), "rb") as f:
                    files[name] = f.read()
        return ModelArtifact(kind, files, f"ZenML artifact {self.uri}")  # type: ignore[arg-type]

    def save(self, data: ModelArtifact) -> None:
        with fileio.open(os.path.join(self.uri, "kind.txt"), "w") as f:
            f.write(data.kind)
        for name, blob in data.files.items():
            with fileio.open(os.path.join(self.uri, name), "wb") as f:
                f.write(blob)

    def compute_content_hash(self, data: ModelArtifact) -> str:
        """Steps downstream of a model are cached on its content: a retrained model with
        the same weights keeps their cache."""
        return data.content_id()

    def extract_metadata(self, data: ModelArtifact) -> dict[str, Any]:
        size = sum(len(b) for b in data.files.values())
        return {"kind": data.kind, "bytes": size}

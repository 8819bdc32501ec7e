"""Trained models as files: safetensors weights + a JSON config, never pickled modules.

A `ModelArtifact` is what travels between pipeline steps (ZenML stores its files through
a materializer), what MLflow keeps, and what `dalle2 generate` loads back.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from dalle2.clip import OpenClip, load_clip
from dalle2.config import DecoderStageConfig, PriorConfig
from dalle2.decoder import DecoderStage
from dalle2.prior import DiffusionPrior

Kind = Literal["clip", "prior", "decoder_stage"]


@dataclass
class ModelArtifact:
    """A model's files in memory: {filename: bytes}, plus which kind of model it is."""

    kind: Kind
    files: dict[str, bytes] = field(default_factory=dict)

    def to_dir(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "kind.txt").write_text(self.kind)
        for name, data in self.files.items():
            (out_dir / name).write_bytes(data)
        return out_dir

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelArtifact:
        model_dir = Path(model_dir)
        kind_file = model_dir / "kind.txt"
        if not kind_file.is_file():
            raise FileNotFoundError(f"{model_dir} holds no saved model (kind.txt is missing)")
        files = {
            p.name: p.read_bytes()
            for p in sorted(model_dir.iterdir())
            if p.is_file() and p.suffix in (".json", ".safetensors")
        }
        return cls(kind_file.read_text().strip(), files)  # type: ignore[arg-type]

    @property
    def config(self) -> dict:
        return json.loads(self.files["config.json"])

    def content_id(self) -> str:
        """sha256 over the kind and every file: equal weights and config, equal id (ZenML's
        cache keys and the embeddings' folder name use it)."""
        h = hashlib.sha256(self.kind.encode())
        for name in sorted(self.files):
            h.update(b"\0" + name.encode() + b"\0" + self.files[name])
        return h.hexdigest()


def _weights(module: nn.Module) -> bytes:
    return save_safetensors(
        {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    )


def pack_clip(clip: OpenClip) -> ModelArtifact:
    with tempfile.TemporaryDirectory() as tmp:
        clip.save(Path(tmp))
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    return ModelArtifact("clip", files)


def pack_prior(prior: DiffusionPrior) -> ModelArtifact:
    """Weights of `prior` (pass the EMA copy) + its PriorConfig."""
    config = prior.cfg.model_dump_json(indent=1).encode()
    return ModelArtifact("prior", {"config.json": config, "model.safetensors": _weights(prior)})


def pack_stage(stage: DecoderStage, index: int) -> ModelArtifact:
    cfg = json.loads(stage.cfg.model_dump_json())
    config = json.dumps({"index": index, "stage": cfg}, indent=1).encode()
    return ModelArtifact(
        "decoder_stage", {"config.json": config, "model.safetensors": _weights(stage)}
    )


def _load_state(module: nn.Module, artifact: ModelArtifact) -> None:
    module.load_state_dict(load_safetensors(artifact.files["model.safetensors"]))


def _expect(artifact: ModelArtifact, kind: Kind) -> None:
    if artifact.kind != kind:
        raise ValueError(f"expected a saved {kind}, got a saved {artifact.kind}")


def unpack_clip(artifact: ModelArtifact) -> OpenClip:
    _expect(artifact, "clip")
    with tempfile.TemporaryDirectory() as tmp:
        return load_clip(artifact.to_dir(Path(tmp)))


def unpack_prior(artifact: ModelArtifact) -> DiffusionPrior:
    _expect(artifact, "prior")
    prior = DiffusionPrior(PriorConfig.model_validate(artifact.config))
    _load_state(prior, artifact)
    return prior.eval()


def unpack_stage(artifact: ModelArtifact) -> tuple[int, DecoderStage]:
    _expect(artifact, "decoder_stage")
    meta = artifact.config
    stage = DecoderStage(DecoderStageConfig.model_validate(meta["stage"]))
    _load_state(stage, artifact)
    return int(meta["index"]), stage.eval()

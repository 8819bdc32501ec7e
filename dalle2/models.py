"""Trained models as files: safetensors weights + a JSON config, never pickled modules.

A `ModelArtifact` is what travels between pipeline steps (ZenML stores its files through
a materializer), what MLflow keeps, and what `UnCLIP.load` reads back.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from dalle2.config import DecoderStageConfig, PriorConfig
from dalle2.decoder import DecoderStage
from dalle2.prior import DiffusionPrior

if TYPE_CHECKING:  # open_clip (with timm and torchvision) takes seconds to import: a
    from dalle2.clip import OpenClip  # training worker of the prior or a unet needs none of it

Kind = Literal["clip", "prior", "decoder_stage"]
KINDS = ("clip", "prior", "decoder_stage")
MANIFEST = "manifest.json"  # {"kind", "sha256": {file: digest}}, written with the files


class ModelFileError(ValueError):
    """A saved model is damaged, of another kind, or does not fit its own config."""


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


@dataclass
class ModelArtifact:
    """A model's files in memory: {filename: bytes}, plus which kind of model it is.

    `where` names the files' origin in error messages (a folder, or an artifact).
    """

    kind: Kind
    files: dict[str, bytes] = field(default_factory=dict)
    where: str = field(default="a model artifact", compare=False)

    @classmethod
    def build(cls, kind: Kind, files: dict[str, bytes]) -> ModelArtifact:
        """The files plus a manifest of their sha256, checked by every load (verify)."""
        digests = {name: _sha256(blob) for name, blob in sorted(files.items())}
        manifest = json.dumps({"kind": kind, "sha256": digests}, indent=1).encode()
        return cls(kind, {**files, MANIFEST: manifest})

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
            raise ModelFileError(f"{model_dir} holds no saved model (kind.txt is missing)")
        files = {
            p.name: p.read_bytes()
            for p in sorted(model_dir.iterdir())
            if p.is_file() and p.suffix in (".json", ".safetensors")
        }
        kind = kind_file.read_text().strip()
        if kind not in KINDS:
            raise ModelFileError(f"{kind_file} names an unknown kind of model, {kind[:40]!r}")
        return cls(kind, files, str(model_dir))  # type: ignore[arg-type]

    def verify(self) -> None:
        """Refuse files that are not the ones written at save: each file's sha256 against
        the manifest, nothing missing, nothing added, the kind the manifest names."""
        raw = self.files.get(MANIFEST)
        if raw is None:
            raise ModelFileError(
                f"{self.where} has no {MANIFEST} (saved by an older version or stripped), so "
                "its files cannot be checked; retrain or re-export the model"
            )
        try:
            manifest = json.loads(raw)
            kind, digests = manifest["kind"], dict(manifest["sha256"])
        except (ValueError, KeyError, TypeError):
            raise ModelFileError(f"{self.where}/{MANIFEST} is not a valid manifest") from None
        if kind != self.kind:
            raise ModelFileError(
                f"{self.where} is a saved {self.kind} but its manifest says {kind}"
            )
        for name, digest in digests.items():
            if name not in self.files:
                raise ModelFileError(f"{self.where}/{name} is missing")
            if _sha256(self.files[name]) != digest:
                raise ModelFileError(
                    f"{self.where}/{name} is damaged: its sha256 is not the one recorded when "
                    f"it was saved ({MANIFEST})"
                )
        extra = sorted(set(self.files) - set(digests) - {MANIFEST})
        if extra:
            raise ModelFileError(f"{self.where} holds files its manifest does not list: {extra}")

    @property
    def config(self) -> dict:
        try:
            config = json.loads(self.files["config.json"])
        except (KeyError, ValueError):
            raise ModelFileError(f"{self.where}/config.json is missing or not JSON") from None
        if not isinstance(config, dict):
            raise ModelFileError(f"{self.where}/config.json does not hold an object")
        return config

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


def check_finite(module: nn.Module, where: str) -> None:
    """NaN or infinite weights load silently and sample noise: refuse them by name."""
    for name, t in module.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"{where} holds NaN or infinite weights ({name})")


def pack_clip(clip: OpenClip) -> ModelArtifact:
    with tempfile.TemporaryDirectory() as tmp:
        clip.save(Path(tmp))
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    return ModelArtifact.build("clip", files)


def pack_prior(prior: DiffusionPrior) -> ModelArtifact:
    """Weights of `prior` (pass the EMA copy) + its PriorConfig."""
    config = prior.cfg.model_dump_json(indent=1).encode()
    return ModelArtifact.build(
        "prior", {"config.json": config, "model.safetensors": _weights(prior)}
    )


def pack_stage(stage: DecoderStage, index: int) -> ModelArtifact:
    cfg = json.loads(stage.cfg.model_dump_json())
    config = json.dumps({"index": index, "stage": cfg}, indent=1).encode()
    return ModelArtifact.build(
        "decoder_stage", {"config.json": config, "model.safetensors": _weights(stage)}
    )


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], data: Any, artifact: ModelArtifact) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        at = ".".join(str(p) for p in first["loc"]) or "its top level"
        raise ModelFileError(
            f"{artifact.where}/config.json is not a valid {artifact.kind} config "
            f"(at {at}: {first['msg']})"
        ) from None


def _load_state(module: nn.Module, artifact: ModelArtifact) -> None:
    where = f"{artifact.where}/model.safetensors"
    try:
        tensors = load_safetensors(artifact.files["model.safetensors"])
    except KeyError:
        raise ModelFileError(f"{where} is missing") from None
    except Exception as err:  # safetensors raises its own error types on bad bytes
        raise ModelFileError(f"{where} is not a readable safetensors file ({err})") from None
    try:
        module.load_state_dict(tensors)
    except RuntimeError:
        raise ModelFileError(
            f"{where} does not fit the model its config.json describes (a changed layer "
            "size, or the weights of another model)"
        ) from None
    check_finite(module, where)


def _expect(artifact: ModelArtifact, kind: Kind) -> None:
    if artifact.kind != kind:
        raise ModelFileError(f"{artifact.where} is a saved {artifact.kind}, not a {kind}")
    artifact.verify()


def unpack_clip(artifact: ModelArtifact) -> OpenClip:
    from dalle2.clip import load_clip

    _expect(artifact, "clip")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            clip = load_clip(artifact.to_dir(Path(tmp)))
        except (ValueError, KeyError, TypeError) as err:
            raise ModelFileError(f"{artifact.where} is not a loadable CLIP ({err})") from None
    check_finite(clip.model, f"{artifact.where}/clip.safetensors")
    return clip


def unpack_prior(artifact: ModelArtifact) -> DiffusionPrior:
    _expect(artifact, "prior")
    prior = DiffusionPrior(_parse(PriorConfig, artifact.config, artifact))
    _load_state(prior, artifact)
    return prior.eval()


def unpack_stage(artifact: ModelArtifact) -> tuple[int, DecoderStage]:
    _expect(artifact, "decoder_stage")
    meta = artifact.config
    if not isinstance(meta.get("index"), int) or meta["index"] < 0:
        raise ModelFileError(f"{artifact.where}/config.json lacks the stage's index")
    stage = DecoderStage(_parse(DecoderStageConfig, meta.get("stage"), artifact))
    _load_state(stage, artifact)
    return meta["index"], stage.eval()


_STAGE_DIR = re.compile(r"decoder_unet_(\d+)")


def model_names(held: Iterable[str] = (), num_stages: int | None = None) -> list[str]:
    """The folders of a complete models folder (a run's `models/`, the pyfunc's `models`):
    clip/, prior/ and decoder_unet_{i}/ for each of the cascade's `num_stages` stages.

    No saved model says how many stages its cascade has (a stage's config.json holds its
    own index only), so without `num_stages` (the run's config knows it) the count is read
    from the folder names `held`, up to the highest index: that finds a gap, decoder_unet_2/
    without decoder_unet_1/, but not a missing last upsampler."""
    if num_stages is None:
        indices = [int(m[1]) for n in held if (m := _STAGE_DIR.fullmatch(n))]
        num_stages = max(indices, default=0) + 1
    return ["clip", "prior", *(f"decoder_unet_{i}" for i in range(num_stages))]


def check_complete(held: Iterable[str], num_stages: int | None, where: str, hint: str = "") -> None:
    """Refuse, in one sentence, a models folder that lacks a model: loaded anyway, a cascade
    without its last upsampler draws smaller images and says nothing."""
    held = set(held)
    expected = model_names(held, num_stages)
    missing = [n for n in expected if n not in held]
    if missing:
        raise ModelFileError(
            f"{where} lacks the model folder(s) {', '.join(missing)} of its "
            f"{len(expected) - 2}-stage cascade{hint}"
        )

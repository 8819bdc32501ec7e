"""CLIP for unCLIP: a small protocol and its open_clip implementation.

The prior and decoder only need `encode_text` and `encode_image`. A pretrained open_clip
model (a name plus a tag, or a local weight file) and a CLIP trained here from scratch go
through the same class, so loading code is shared and tested with local files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle2.config import ClipTowerConfig
from dalle2.training.checkpoint import load_weights, save_weights

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipWeightsError(RuntimeError):
    """Pretrained CLIP weights could not be found or loaded."""


@dataclass
class TextEncoding:
    """What CLIP says about a batch of captions."""

    embed: Tensor  # (B, E) pooled, projected text embedding (not normalised)
    tokens: Tensor | None  # (B, L, D) per-token encodings, or None when not asked for
    mask: Tensor | None  # (B, L) bool, True for real tokens


class ClipEncoder(Protocol):
    """The part of CLIP that unCLIP uses."""

    embed_dim: int
    text_token_dim: int

    def encode_text(self, captions: Sequence[str], with_tokens: bool = False) -> TextEncoding: ...

    def encode_image(self, images: Tensor) -> Tensor: ...


class OpenClip(nn.Module):
    """An open_clip CLIP with its tokenizer, optional compact vocabulary and preprocessing."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        source: dict[str, Any],
        vocab: list[int] | None = None,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.source = source  # how to rebuild: {"kind": "scratch"|"pretrained", ...}
        self.vocab = vocab
        visual_size = model.visual.image_size
        self.image_size = int(visual_size[0] if isinstance(visual_size, tuple) else visual_size)
        self.embed_dim = int(model.text_projection.shape[-1])
        self.text_token_dim = int(model.token_embedding.weight.shape[-1])
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if vocab is not None:
            # BPE id -> compact id; unknown BPE ids fall back to 0 (the padding id).
            lut = torch.zeros(max(vocab) + 1, dtype=torch.long)
            lut[torch.tensor(vocab)] = torch.arange(len(vocab))
            self.register_buffer("lut", lut, persistent=False)
        else:
            self.lut = None

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """Caption strings -> (B, L) token ids in this model's table."""
        ids = self.tokenizer(list(captions)).to(self.device)
        if self.lut is not None:
            ids = self.lut[ids.clamp(max=self.lut.numel() - 1)]
        return ids

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (B, H, W, 3) or float [0,1] (B, 3, H, W) -> normalised model input."""
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2).float() / 255.0
        images = images.to(self.device)
        if images.shape[-1] != self.image_size:
            images = F.interpolate(
                images, size=self.image_size, mode="bicubic", align_corners=False, antialias=True
            )
        return (images - self.mean) / self.std

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, E) image embedding, not normalised."""
        return self.model.encode_image(self.preprocess(images))

    def encode_text(self, captions: Sequence[str], with_tokens: bool = False) -> TextEncoding:
        ids = self.tokenize(captions)
        if not with_tokens:
            return TextEncoding(self.model.encode_text(ids), None, None)
        return self.encode_token_ids(ids)

    def encode_token_ids(self, ids: Tensor) -> TextEncoding:
        """Pooled embedding plus per-token encodings, from open_clip's own text tower parts."""
        m = self.model
        x = m.token_embedding(ids) + m.positional_embedding[: ids.shape[1]]
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))  # (B, L, D)
        pooled = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        embed = pooled @ m.text_projection
        length = ids.argmax(dim=-1) + 1  # through the end-of-text token
        mask = torch.arange(ids.shape[1], device=ids.device)[None] < length[:, None]
        return TextEncoding(embed, x, mask)

    def forward(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised image and text features plus the logit scale, for contrastive training."""
        img = F.normalize(self.model.encode_image(self.preprocess(images)), dim=-1)
        txt = F.normalize(self.model.encode_text(ids), dim=-1)
        return img, txt, self.model.logit_scale.exp()

    # ------------------------------------------------------------------ persistence
    def save(self, out_dir: Path) -> None:
        """Write clip.json (+ clip.safetensors for a CLIP trained here)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = dict(self.source, vocab=self.vocab)
        (out_dir / "clip.json").write_text(json.dumps(meta, indent=1))
        if self.source["kind"] == "scratch":
            save_weights(self.model, out_dir / "clip.safetensors")


def _bpe_tokenizer(context_length: int) -> Any:
    return open_clip.get_tokenizer("ViT-B-32", context_length=context_length)


def build_scratch_clip(cfg: ClipTowerConfig, captions: Sequence[str]) -> OpenClip:
    """A small open_clip CLIP whose token table holds only the tokens `captions` use."""
    tokenizer = _bpe_tokenizer(cfg.context_length)
    vocab = None
    vocab_size = 49408
    if cfg.compact_vocab:
        used = torch.unique(tokenizer(sorted(set(captions))))
        # Keep order so the end-of-text token stays the largest id (open_clip pools at argmax).
        vocab = sorted(set(used.tolist()) | {0})
        vocab_size = len(vocab)
    resnet = not isinstance(cfg.vision_layers, int)
    source = {
        "kind": "scratch",
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "width": cfg.vision_width,
            "layers": cfg.vision_layers,
            # ModifiedResNet's attention pool is vision_width * 32 wide: 64-wide heads there
            "head_width": 64 if resnet else cfg.vision_width // cfg.heads,
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": vocab_size,
            "width": cfg.text_width,
            "heads": cfg.heads,
            "layers": cfg.text_layers,
        },
    }
    return _from_source(source, vocab)


def _from_source(source: dict[str, Any], vocab: list[int] | None) -> OpenClip:
    model = open_clip.CLIP(
        embed_dim=source["embed_dim"],
        vision_cfg=source["vision_cfg"],
        text_cfg=source["text_cfg"],
    )
    tokenizer = _bpe_tokenizer(source["text_cfg"]["context_length"])
    return OpenClip(model, tokenizer, source=source, vocab=vocab)


def load_pretrained_clip(model_name: str, weights: str | None) -> OpenClip:
    """An open_clip model by name with weights from a tag ("openai") or a local file.

    `model_name` may also be "local-dir:/path" (open_clip_config.json + weights inside).
    """
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=weights, require_pretrained=weights is not None
        )
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as err:  # open_clip raises many types for missing/offline weights
        where = f"'{model_name}'" + (f" with weights '{weights}'" if weights else "")
        raise ClipWeightsError(
            f"could not load pretrained CLIP {where} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); point clip.pretrained_weights at a local "
            "weight file, or leave clip.pretrained_model empty to train a CLIP here"
        ) from None
    norm = next((t for t in preprocess.transforms if hasattr(t, "mean")), None)
    mean = tuple(norm.mean) if norm is not None else OPENAI_MEAN
    std = tuple(norm.std) if norm is not None else OPENAI_STD
    source = {"kind": "pretrained", "model": model_name, "weights": weights}
    return OpenClip(model.eval(), tokenizer, source=source, mean=mean, std=std)


def load_clip(model_dir: Path) -> OpenClip:
    """Rebuild a CLIP saved by `OpenClip.save` (never executes code from the files)."""
    meta_path = model_dir / "clip.json"
    if not meta_path.is_file():
        raise ClipWeightsError(f"no CLIP found at {model_dir} (clip.json is missing)")
    meta = json.loads(meta_path.read_text())
    vocab = meta.pop("vocab", None)
    if meta["kind"] == "pretrained":
        return load_pretrained_clip(meta["model"], meta["weights"])
    clip = _from_source(meta, vocab)
    load_weights(clip.model, model_dir / "clip.safetensors")
    return clip.eval()

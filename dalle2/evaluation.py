"""Metrics for generated images: FID (torch-fidelity), CLIP score, prior similarities.

Standard FID needs torch-fidelity's InceptionV3 weights. Offline, without them, the same
torch-fidelity code computes a Frechet distance in the pipeline CLIP's image-feature space;
that number is reported as `clip_frechet_distance`, never as `fid`.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

INCEPTION_CACHE_NAME = "pt_inception-2015-12-05-6726825d.pth"


class ImageTensors(Dataset):
    """uint8 (N, 3, H, W) images as the Dataset that torch-fidelity reads."""

    def __init__(self, images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("expected uint8 images of shape (N, 3, H, W)")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def to_uint8(images: Tensor) -> Tensor:
    """[0, 1] float (N, 3, H, W) -> uint8."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


_ids = itertools.count()


def register_clip_extractor(clip: torch.nn.Module) -> str:
    """Register `clip`'s image tower as a torch-fidelity feature extractor; returns its name."""
    name = f"dalle2-clip-{os.getpid()}-{next(_ids)}"

    class ClipFeatures(torch_fidelity.FeatureExtractorBase):
        def __init__(self, name: str, features_list: list[str], **kwargs: object) -> None:
            super().__init__(name, features_list)
            self.clip = clip

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("clip",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "clip"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> Tensor:
            return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

        def forward(self, x: Tensor) -> tuple[Tensor]:
            images = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, 3) uint8
            return (F.normalize(self.clip.encode_image(images).float(), dim=-1).cpu(),)

    torch_fidelity.register_feature_extractor(name, ClipFeatures)
    return name


def find_inception_weights(path: str | None) -> str | None:
    """The InceptionV3 weight file to use: the configured path, else torch's hub cache."""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"InceptionV3 weights not found at {path}")
        # torch-fidelity unpickles the file in full; first make sure it holds tensors only
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # the safe unpickler refuses anything but tensors
            raise ValueError(
                f"{path} is not an InceptionV3 state dict of plain tensors ({type(err).__name__})"
            ) from None
        if not isinstance(state, dict) or "fc.weight" not in state:
            raise ValueError(f"{path} is not torch-fidelity's InceptionV3 weights (no fc.weight)")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_CACHE_NAME
    return str(cached) if cached.is_file() else None


def frechet_distance(
    generated: Tensor,
    reference: Tensor,
    *,
    clip: torch.nn.Module | None = None,
    inception_weights: str | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """{"fid": ...} with InceptionV3 weights, else {"clip_frechet_distance": ...} with `clip`.

    Both inputs are uint8 (N, 3, H, W).
    """
    common = dict(
        input1=ImageTensors(generated),
        input2=ImageTensors(reference),
        fid=True,
        cuda=torch.cuda.is_available(),
        batch_size=batch_size,
        verbose=False,
        cache=False,
        samples_shuffle=False,
    )
    weights = find_inception_weights(inception_weights)
    if weights is not None:
        out = torch_fidelity.calculate_metrics(
            feature_extractor="inception-v3-compat",
            feature_extractor_weights_path=weights,
            **common,
        )
        return {"fid": float(out["frechet_inception_distance"])}
    if clip is None:
        raise ValueError("no InceptionV3 weights and no CLIP to fall back on for the distance")
    name = register_clip_extractor(clip)
    out = torch_fidelity.calculate_metrics(feature_extractor=name, **common)
    return {"clip_frechet_distance": float(out["frechet_inception_distance"])}


@torch.no_grad()
def clip_score(clip: torch.nn.Module, images: Tensor, captions: list[str]) -> float:
    """100 * mean max(cos(image, caption), 0) (Hessel et al. 2021, scaled like torchmetrics)."""
    img = F.normalize(clip.encode_image(images.permute(0, 2, 3, 1).contiguous()).float(), dim=-1)
    txt = F.normalize(clip.encode_text(captions).embed.float(), dim=-1)
    return float(100 * (img * txt).sum(-1).clamp(min=0).mean())


def prior_similarities(
    predicted: Tensor, image_embed: Tensor, text_embed: Tensor
) -> dict[str, float]:
    """Cosine similarities that tell whether the prior helps.

    - prior_cos_true: predicted vs the true image embedding of the caption's image
    - text_image_cos: the baseline of using the text embedding directly
    - prior_cos_unrelated: predicted vs the image embedding of another (shifted) pair
    """
    p, i, t = (F.normalize(x.float(), dim=-1) for x in (predicted, image_embed, text_embed))
    return {
        "prior_cos_true": float((p * i).sum(-1).mean()),
        "text_image_cos": float((t * i).sum(-1).mean()),
        "prior_cos_unrelated": float((p * i.roll(1, dims=0)).sum(-1).mean()),
    }


def image_grid(images: np.ndarray, captions: list[str] | None = None, cols: int = 8) -> Image.Image:
    """(N, H, W, 3) uint8 images tiled into one PIL image, row-major."""
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = images[
            k
        ]
    return Image.fromarray(grid)

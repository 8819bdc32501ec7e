"""Metrics for generated images: FID (torch-fidelity), CLIP score, prior similarities,
caption retrieval, nearest training neighbours; and the captioned sample grid.

Standard FID needs torch-fidelity's InceptionV3 weights. Offline, without them, the same
torch-fidelity code computes a Frechet distance in the pipeline CLIP's image-feature space;
that number is reported as `clip_frechet_distance`, never as `fid`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
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


def empty_canvas(images: Tensor, min_fraction: float = 0.005, distance: float = 50.0) -> Tensor:
    """Which uint8 (N, 3, H, W) images show nothing but their background: a prompt whose
    object was never drawn. Knows no dataset: the background is the median colour of the
    border; the rest must differ from it by `distance` (RGB) over `min_fraction` of the
    image after a 3x3 opening, so that a speck or a dot of a few pixels counts as empty."""
    x = images.float()
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    far = ((x - background).norm(dim=1, keepdim=True) > distance).float()
    opened = F.max_pool2d(-F.max_pool2d(-far, 3, 1, 1), 3, 1, 1)  # erode, then dilate
    return opened.flatten(1).sum(1) < min_fraction * x.shape[-1] * x.shape[-2]


def register_clip_extractor(clip: torch.nn.Module) -> str:
    """Register `clip`'s image tower as a torch-fidelity feature extractor; returns its name."""
    import torch_fidelity  # with torchvision: seconds to import, paid only where measured

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
    import torch_fidelity  # lazily, as in register_clip_extractor

    common = dict(
        input1=ImageTensors(generated),
        input2=ImageTensors(reference),
        fid=True,
        cuda=torch.cuda.is_available(),
        batch_size=batch_size,
        verbose=False,
        cache=False,
        samples_shuffle=False,
        save_cpu_ram=True,  # no loader worker processes: the images are in memory already
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


def caption_ranks(
    image_embeds: Tensor, caption_embeds: Tensor, targets: Tensor, tie: float = 1e-5
) -> Tensor:
    """Rank (1 = best) of each image's own caption among all captions, by cosine similarity.

    Ties count against the image (rank = captions scoring at least as high as the target,
    within `tie`: one matmul does not give identical rows bit-identical scores), so a
    collapsed CLIP that gives every caption one embedding ranks every target last.

    Args:
        image_embeds: (N, E) image embeddings.
        caption_embeds: (C, E) text embeddings of the candidate captions.
        targets: (N,) index of each image's caption among the candidates.
        tie: cosines this close to the target's count as ties.
    """
    img = F.normalize(image_embeds.float(), dim=-1)
    txt = F.normalize(caption_embeds.float(), dim=-1)
    sims = img @ txt.T  # (N, C)
    own = sims.gather(1, targets.long()[:, None])  # (N, 1)
    return (sims >= own - tie).sum(1)


def retrieval_summary(ranks: Tensor) -> dict[str, float]:
    """Fractions of ranks at 1 and within 5, and the median rank (chance top1 = 1 / C)."""
    r = ranks.float()
    return {
        "top1": float((r <= 1).float().mean()),
        "top5": float((r <= 5).float().mean()),
        "median_rank": float(np.median(r.numpy())),
    }


def other_caption_partners(captions: Sequence[str]) -> list[int]:
    """For each position, the next one (cyclically) whose caption differs; [] when all agree.

    An image paired with another prompt's caption this way is what a model that ignores
    its prompt would draw: the floor of caption retrieval.
    """
    n = len(captions)
    partners = []
    for i, caption in enumerate(captions):
        j = next((k % n for k in range(i + 1, i + n) if captions[k % n] != caption), None)
        if j is None:
            return []
        partners.append(j)
    return partners


def nearest_cosine_distance(queries: Tensor, references: Tensor, chunk: int = 8192) -> Tensor:
    """(N,) 1 - max cosine of each query to any reference row.

    References are normalised and compared `chunk` rows at a time, so float16 embeddings of
    a large training set never exist in float32 all at once.
    """
    if len(references) == 0:
        raise ValueError("no reference embeddings to find neighbours among")
    q = F.normalize(queries.float(), dim=-1)
    best = torch.full((len(q),), -1.0)
    for start in range(0, len(references), chunk):
        r = F.normalize(references[start : start + chunk].float(), dim=-1)
        best = torch.maximum(best, (q @ r.T).amax(dim=1))
    return 1 - best


GRID_SCALE = 2  # nearest-neighbour upscaling: 64 px samples are too small to judge at 1x
GRID_PAD = 6  # pixels between images, cells and text
CAPTION_LINES = 3  # lines of prompt under a pair; longer prompts end in "..."


def wrap_text(
    text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float, max_lines: int
) -> list[str]:
    """Greedy word wrap to `width` pixels in `font`, at most `max_lines` lines.

    A word wider than a line is broken; text that does not fit ends in "...".
    """
    lines: list[str] = []
    line = ""
    for word in text.split():
        while word:
            trial = f"{line} {word}" if line else word
            if font.getlength(trial) <= width:
                line, word = trial, ""
            elif line:
                lines.append(line)
                line = ""
            else:  # alone on its line and still too wide: break the word
                fits = (k for k in range(len(word), 1, -1) if font.getlength(word[:k]) <= width)
                n = next(fits, 1)
                lines.append(word[:n])
                word = word[n:]
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last.rstrip() + "..."]
    return lines


def captioned_grid(
    generated: np.ndarray, real: np.ndarray, captions: Sequence[str], cols: int = 4
) -> Image.Image:
    """Each prompt's generated image beside the real image of its caption, the prompt below.

    Images are (N, H, W, 3) uint8 of one size, shown GRID_SCALE x larger (nearest
    neighbour); prompts are wrapped to the cell's width in PIL's default font, at most
    CAPTION_LINES lines; a header row over each column names its images "generated | real".
    Cells are filled row-major, `cols` to a row.
    """
    if generated.shape != real.shape or len(captions) != len(generated):
        raise ValueError(
            f"{len(generated)} generated images {generated.shape[1:]}, {len(real)} real "
            f"{real.shape[1:]} and {len(captions)} captions: need one of each per prompt"
        )
    n, h, w, _ = generated.shape
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    img_h, img_w = h * GRID_SCALE, w * GRID_SCALE
    cell_w = 2 * img_w + GRID_PAD
    cell_h = img_h + GRID_PAD + CAPTION_LINES * line_h
    header_h = line_h + GRID_PAD
    rows = (n + cols - 1) // cols
    canvas = Image.new(
        "RGB",
        (cols * (cell_w + GRID_PAD) + GRID_PAD, header_h + rows * (cell_h + GRID_PAD) + GRID_PAD),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for c in range(min(cols, n)):
        x = GRID_PAD + c * (cell_w + GRID_PAD)
        for label, left in (("generated", x), ("real", x + img_w + GRID_PAD)):
            offset = max(0.0, (img_w - font.getlength(label)) / 2)
            draw.text((left + offset, GRID_PAD), label, fill="black", font=font)
    for k in range(n):
        r, c = divmod(k, cols)
        x = GRID_PAD + c * (cell_w + GRID_PAD)
        y = header_h + GRID_PAD + r * (cell_h + GRID_PAD)
        for i, image in enumerate((generated[k], real[k])):
            big = image.repeat(GRID_SCALE, axis=0).repeat(GRID_SCALE, axis=1)
            canvas.paste(Image.fromarray(big), (x + i * (img_w + GRID_PAD), y))
        for j, text in enumerate(wrap_text(captions[k], font, cell_w, CAPTION_LINES)):
            draw.text((x, y + img_h + GRID_PAD + j * line_h), text, fill="black", font=font)
    return canvas

"""Images and masks from users (files for the CLI, base64 PNGs for the server), checked and
read the same way for both; a bad one is refused in one sentence."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 4096 * 4096  # a larger upload is refused before it is decoded


class ImageInputError(ValueError):
    """An image or mask that cannot be used; the message says which and why."""


def _open(source: Path | bytes, what: str) -> Image.Image:
    if isinstance(source, Path) and not source.is_file():
        raise ImageInputError(f"{what} does not exist")
    try:
        image = Image.open(source if isinstance(source, Path) else io.BytesIO(source))
        if image.width * image.height > MAX_PIXELS:
            raise ImageInputError(f"{what} is {image.width}x{image.height}; send at most 4096x4096")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ImageInputError(f"{what} cannot be read as an image") from None
    return image


def read_image(source: Path | bytes, size: int, what: str) -> torch.Tensor:
    """(3, size, size) floats in [0, 1], centre-cropped to a square."""
    with _open(source, what) as im:
        rgb = ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float() / 255


def read_mask(
    source: Path | bytes, image: Path | bytes, size: int, what: str, image_what: str
) -> torch.Tensor:
    """(1, size, size): 1 where the image is redrawn (white in the mask), 0 where it is kept
    (black), cropped and resized as read_image does the image. The mask must be the image's
    size, hold only black and white, and mark at least one pixel."""
    with _open(image, image_what) as im:
        image_size = im.size
    with _open(source, what) as m:
        if m.size != image_size:
            raise ImageInputError(
                f"{what} is {m.width}x{m.height} but the image is "
                f"{image_size[0]}x{image_size[1]}; send a mask of the image's size"
            )
        grey = m.convert("L")
    values = np.unique(np.asarray(grey))
    if not set(values.tolist()) <= {0, 255}:
        raise ImageInputError(
            f"{what} is not binary (it holds {len(values)} grey levels); use black (0) for "
            "pixels to keep and white (255) for pixels to redraw"
        )
    if 255 not in values:
        raise ImageInputError(f"{what} marks no pixel to redraw; paint the region white")
    fitted = ImageOps.fit(grey, (size, size), Image.Resampling.NEAREST)
    mask = torch.from_numpy(np.asarray(fitted).copy()).float()[None] / 255
    if not bool(mask.any()):
        raise ImageInputError(f"{what}'s white region vanishes at {size}x{size}; enlarge it")
    return mask

"""shapes64: the embedded, offline, captioned dataset and its prompt-fidelity reader.

The machines this project is built on have no internet, so the default dataset is generated
here: one flat-coloured, axis-aligned shape on a flat background per image, captioned
"a {size} {color} {shape} on a {background} background" (DESIGN.md, "The embedded default
dataset"). Because the world is this small, the attributes of any image (generated ones
included) can be read back from its pixels, which gives a quality measure that needs no
pretrained network: prompt fidelity.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 180, 20),
    "blue": (20, 60, 220),
    "yellow": (240, 210, 0),
    "purple": (140, 30, 180),
    "orange": (250, 130, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Side in pixels at 64x64, both ends inclusive; other image sizes scale these.
SIZES: dict[str, tuple[int, int]] = {"small": (14, 20), "large": (30, 40)}

_REFERENCE_SIZE = 64  # the resolution at which SIZES and the margin are stated
_MARGIN = 2  # minimum empty pixels between the shape and the image edge, at 64 px

_CAPTION_RE = re.compile(
    r"a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) on a (?P<background>\w+) background"
)


@dataclass(frozen=True)
class ShapeSpec:
    """What one shapes64 image shows; the caption is derived, never stored separately."""

    size: str
    color: str
    shape: str
    background: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("size", self.size, SIZES),
            ("color", self.color, COLORS),
            ("shape", self.shape, SHAPES),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(allowed)}.")

    @property
    def caption(self) -> str:
        """The one caption of this spec, e.g. "a small red circle on a white background"."""
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background"


def all_specs() -> list[ShapeSpec]:
    """All 108 combinations in a fixed order (size, color, shape, background nesting)."""
    return [ShapeSpec(*combo) for combo in product(SIZES, COLORS, SHAPES, BACKGROUNDS)]


def parse_caption(caption: str) -> ShapeSpec | None:
    """The spec a caption asks for, or None when the caption is not of the shapes64 grammar."""
    match = _CAPTION_RE.fullmatch(caption.strip())
    if match is None:
        return None
    try:
        return ShapeSpec(**match.groupdict())
    except ValueError:
        return None


# ----------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask whose bounding box is exactly side x side.

    Pixels are tested at their centres (circle) or at the bottom edge of their row
    (triangle), so the rasterisation is flat, exact and the same for every caller.
    """
    centre = side / 2
    ys, xs = np.mgrid[0:side, 0:side]
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return (xs + 0.5 - centre) ** 2 + (ys + 0.5 - centre) ** 2 <= centre**2
    if shape == "triangle":
        # Apex up: the half-width grows linearly from 0 at the top to side/2 at the base.
        half_width = (ys + 1) / 2
        return np.abs(xs + 0.5 - centre) <= half_width
    raise ValueError(f"Unknown shape {shape!r}; choose one of {', '.join(SHAPES)}.")


def _scaled_range(size: str, image_size: int) -> tuple[int, int]:
    lo, hi = SIZES[size]
    scale = image_size / _REFERENCE_SIZE
    return max(1, round(lo * scale)), max(1, round(hi * scale))


def render(spec: ShapeSpec, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
    """Draw one image of `spec`: side uniform in the size range, position uniform inside a margin.

    Returns:
        (image_size, image_size, 3) uint8 array.
    """
    margin = max(_MARGIN, round(_MARGIN * image_size / _REFERENCE_SIZE))
    lo, hi = _scaled_range(spec.size, image_size)
    if hi + 2 * margin > image_size:
        raise ValueError(f"image_size {image_size} is too small for a {spec.size} shape.")
    side = int(rng.integers(lo, hi + 1))
    top = int(rng.integers(margin, image_size - margin - side + 1))
    left = int(rng.integers(margin, image_size - margin - side + 1))

    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[spec.background]
    window = image[top : top + side, left : left + side]
    window[_shape_mask(spec.shape, side)] = COLORS[spec.color]
    return image


def generate(
    out_dir: Path,
    num_images: int,
    seed: int = 0,
    image_size: int = 64,
    progress: bool = False,
) -> pd.DataFrame:
    """Write `num_images` PNGs to out_dir/images/{i:06d}.png, deterministically from `seed`.

    Specs cycle through a fresh seeded permutation of all 108 combinations per cycle, so
    every caption occurs equally often (up to one) whatever `num_images` is.

    Returns:
        DataFrame with columns "path" (absolute path as str) and "caption", one row per image.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}.")
    specs = all_specs()
    rng = np.random.default_rng(seed)
    image_dir = Path(out_dir).resolve() / "images"
    image_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, str]] = []
    order: list[int] = []
    for i in tqdm(range(num_images), desc="shapes64", disable=not progress):
        if not order:
            order = rng.permutation(len(specs)).tolist()
        spec = specs[order.pop()]
        path = image_dir / f"{i:06d}.png"
        Image.fromarray(render(spec, rng, image_size)).save(path, format="PNG")
        rows.append({"path": str(path), "caption": spec.caption})
    return pd.DataFrame(rows, columns=["path", "caption"])


# ----------------------------------------------------------------------------- reading


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dists = np.linalg.norm(np.asarray([palette[n] for n in names], float) - colour, axis=1)
    return names[int(np.argmin(dists))]


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    """Number of set pixels in each 3x3 window (self included)."""
    padded = np.pad(mask.astype(np.int16), 1)
    h, w = mask.shape
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))


def _open(mask: np.ndarray) -> np.ndarray:
    """Morphological opening by a 3x3 square, which keeps squares exactly.

    It drops specks and the one-pixel spurs that noise attaches to an edge, which would
    otherwise stretch the bounding box.
    """
    eroded = _neighbour_count(mask) == 9
    return mask & (_neighbour_count(eroded) > 0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component, so stray specks in generated images do not count.

    Works on horizontal runs with a union-find, so Python loops over runs (~ one per row of a
    shape), not over pixels.
    """
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    edges = np.diff(padded, axis=1)
    run_rows, run_starts = np.nonzero(edges == 1)
    _, run_ends = np.nonzero(edges == -1)  # exclusive; same row-major order as the starts
    runs = list(zip(run_rows.tolist(), run_starts.tolist(), run_ends.tolist(), strict=True))
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # Runs of consecutive rows touch (8-connected) when their column spans overlap or meet
    # diagonally; runs within a row are sorted, so the scan of the previous row stops early.
    prev_first, row_first = 0, 0
    for i, (row, start, end) in enumerate(runs):
        if i and row != runs[i - 1][0]:
            prev_first, row_first = (row_first if runs[i - 1][0] == row - 1 else i), i
        j = prev_first
        while j < row_first and runs[j][0] == row - 1:
            _, p_start, p_end = runs[j]
            if p_start > end:
                break
            if start <= p_end:
                parent[find(j)] = find(i)
            j += 1

    sizes: dict[int, int] = {}
    for i, (_, start, end) in enumerate(runs):
        root = find(i)
        sizes[root] = sizes.get(root, 0) + end - start
    out = np.zeros_like(mask, dtype=bool)
    if sizes:
        best = max(sizes, key=sizes.__getitem__)
        for i, (row, start, end) in enumerate(runs):
            if find(i) == best:
                out[row, start:end] = True
    return out


def _band_width(mask: np.ndarray, start: float, stop: float) -> float:
    """Mean count of set pixels per row, over the rows between fractions start..stop of height."""
    h = mask.shape[0]
    lo = min(int(start * h), h - 1)
    hi = max(int(np.ceil(stop * h)), lo + 1)
    return float(mask[lo:hi].sum(axis=1).mean())


def _classify_shape(mask: np.ndarray) -> str:
    """Circle / square / triangle from the foreground mask cropped to its bounding box.

    A triangle tapers (narrow near the top, wide near the base); circles and squares do not.
    A square fills the rectangle of its middle width and middle height (~1), a disc fills
    ~pi/4 of it. Middle extents, unlike the bounding box, ignore bumps that noise leaves on
    an edge.
    """
    taper = _band_width(mask, 0.15, 0.35) / max(_band_width(mask, 0.65, 0.85), 1.0)
    if taper < 0.75:
        return "triangle"
    middle_width = _band_width(mask, 0.4, 0.6)
    middle_height = _band_width(mask.T, 0.4, 0.6)
    fill = mask.sum() / max(middle_width * middle_height, 1.0)
    return "square" if fill > 0.88 else "circle"


_FOREGROUND_DISTANCE = 50.0  # RGB distance from the background that surely is not noise
_MIN_AREA_FRACTION = 0.002  # smaller foregrounds are specks, not a shape (~8 px at 64x64)


def read_attributes(image: np.ndarray) -> dict[str, str | None]:
    """Read background, color, shape and size from pixels alone (blurry or noisy ones too).

    The background is the median of the border pixels; the foreground is first the pixels
    far from it, whose median gives a shape colour, then (so blur does not grow or shrink the
    shape) every pixel nearer that colour than the background, opened to drop specks and
    kept to its largest component. Attributes other than the background are None when no
    foreground is found.
    """
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"Expected an (H, W, 3) RGB image, got shape {pixels.shape}.")
    pixels = pixels[..., :3]
    if min(pixels.shape[:2]) < _REFERENCE_SIZE:
        # Read small images at 64 px: a 7 px triangle is too few pixels to see its taper,
        # while its bilinear upsampling reads like any slightly blurred 64 px image.
        small = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        pixels = np.asarray(
            small.resize((_REFERENCE_SIZE, _REFERENCE_SIZE), Image.Resampling.BILINEAR)
        )
    pixels = pixels.astype(np.float32)
    h, w = pixels.shape[:2]

    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    bg = np.median(border, axis=0)
    result: dict[str, str | None] = {
        "background": _nearest(bg, BACKGROUNDS),
        "color": None,
        "shape": None,
        "size": None,
    }

    # Opened so that noise specks far from the background do not vote on the shape colour.
    far = _open(np.linalg.norm(pixels - bg, axis=2) > _FOREGROUND_DISTANCE)
    min_area = max(4, int(_MIN_AREA_FRACTION * h * w))
    if far.sum() < min_area:
        return result
    fg = np.median(pixels[far], axis=0)

    # Nearer the shape colour than the background = beyond the 50% contour of a blurred edge.
    nearer = np.linalg.norm(pixels - fg, axis=2) < np.linalg.norm(pixels - bg, axis=2)
    mask = _largest_component(_open(nearer))
    if mask.sum() < min_area:
        return result

    # The colour comes from the interior, away from edge pixels mixed with the background.
    interior = mask & (_neighbour_count(mask) == 9)
    core = interior if interior.sum() >= 4 else mask
    result["color"] = _nearest(np.median(pixels[core], axis=0), COLORS)

    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max((bottom - top) / h, (right - left) / w) * _REFERENCE_SIZE
    threshold = (SIZES["small"][1] + SIZES["large"][0]) / 2
    result["size"] = "small" if side < threshold else "large"
    result["shape"] = _classify_shape(mask[top:bottom, left:right])
    return result


def prompt_fidelity(images: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Share of images whose read attributes match their caption, per attribute and all four.

    Captions outside the shapes64 grammar are skipped.

    Returns:
        {"color", "shape", "size", "background", "all"} -> fraction in [0, 1].
    """
    if len(images) != len(captions):
        raise ValueError(f"Got {len(images)} images but {len(captions)} captions; pass one each.")
    keys = ("color", "shape", "size", "background")
    hits = dict.fromkeys((*keys, "all"), 0)
    counted = 0
    for image, caption in zip(images, captions, strict=True):
        spec = parse_caption(caption)
        if spec is None:
            continue
        read = read_attributes(image)
        right = {key: read[key] == getattr(spec, key) for key in keys}
        for key, ok in right.items():
            hits[key] += ok
        hits["all"] += all(right.values())
        counted += 1
    if counted == 0:
        raise ValueError("No caption is of the shapes64 grammar; nothing to score.")
    return {key: value / counted for key, value in hits.items()}

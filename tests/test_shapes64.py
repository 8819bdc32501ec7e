"""shapes64: exact rendering, deterministic generation, and a reader that survives blur."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dalle2.data.shapes64 import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SIZES,
    ShapeSpec,
    all_specs,
    generate,
    parse_caption,
    prompt_fidelity,
    read_attributes,
    render,
)

ATTRIBUTES = ("background", "color", "shape", "size")


def _foreground_bbox(image: np.ndarray, background: tuple[int, int, int]) -> tuple[int, ...]:
    rows, cols = np.nonzero(np.any(image != np.asarray(background, np.uint8), axis=2))
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def _blur_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=1)), float)
    return np.clip(blurred + rng.normal(0.0, 10.0, blurred.shape), 0, 255).astype(np.uint8)


def _down_up(image: np.ndarray) -> np.ndarray:
    small = Image.fromarray(image).resize((32, 32), Image.Resampling.BILINEAR)
    return np.asarray(small.resize((64, 64), Image.Resampling.BILINEAR))


def _rendered(count_per_spec: int, seed: int) -> list[tuple[ShapeSpec, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(spec, render(spec, rng)) for spec in all_specs() for _ in range(count_per_spec)]


def _accuracy(pairs: list[tuple[ShapeSpec, np.ndarray]]) -> float:
    right = 0
    for spec, image in pairs:
        read = read_attributes(image)
        right += all(read[key] == getattr(spec, key) for key in ATTRIBUTES)
    return right / len(pairs)


# ----------------------------------------------------------------------------- captions


def test_caption_is_exact() -> None:
    spec = ShapeSpec(size="small", color="red", shape="circle", background="white")
    assert spec.caption == "a small red circle on a white background"


def test_all_specs_covers_every_combination_once_in_fixed_order() -> None:
    specs = all_specs()
    assert len(specs) == 108 == len({s.caption for s in specs})
    assert specs == all_specs()
    assert {s.size for s in specs} == set(SIZES)
    assert {s.color for s in specs} == set(COLORS)
    assert {s.shape for s in specs} == set(SHAPES)
    assert {s.background for s in specs} == set(BACKGROUNDS)


def test_palette_is_the_design_one() -> None:
    assert BACKGROUNDS == {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
    assert COLORS["purple"] == (140, 30, 180) and COLORS["orange"] == (250, 130, 0)
    assert SIZES == {"small": (14, 20), "large": (30, 40)}


def test_parse_caption_round_trips() -> None:
    for spec in all_specs():
        assert parse_caption(spec.caption) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a photo of a dog",
        "a huge red circle on a white background",
        "a small pink circle on a white background",
        "a small red circle on a beige background",
        "a small red circle on a white background with a hat",
        "a small red hexagon on a white background",
    ],
)
def test_parse_caption_rejects_other_text(text: str) -> None:
    assert parse_caption(text) is None


def test_spec_rejects_unknown_attribute() -> None:
    with pytest.raises(ValueError, match="color"):
        ShapeSpec(size="small", color="pink", shape="circle", background="white")


# ----------------------------------------------------------------------------- rendering


def test_render_is_exact_flat_and_within_margins() -> None:
    rng = np.random.default_rng(0)
    for spec in all_specs():
        for _ in range(5):
            image = render(spec, rng)
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            background = BACKGROUNDS[spec.background]
            for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
                assert tuple(image[y, x]) == background
            is_shape = np.all(image == np.asarray(COLORS[spec.color], np.uint8), axis=2)
            is_background = np.all(image == np.asarray(background, np.uint8), axis=2)
            assert is_shape.any() and np.all(is_shape | is_background)  # flat: no anti-aliasing
            top, bottom, left, right = _foreground_bbox(image, background)
            assert min(top, left) >= 2 and max(bottom, right) <= 62
            lo, hi = SIZES[spec.size]
            assert lo <= bottom - top <= hi and bottom - top == right - left


def test_render_fill_ratio_matches_the_shape() -> None:
    rng = np.random.default_rng(1)
    expected = {"square": (1.0, 1.0), "circle": (0.75, 0.82), "triangle": (0.5, 0.6)}
    for spec in all_specs():
        image = render(spec, rng)
        top, bottom, left, right = _foreground_bbox(image, BACKGROUNDS[spec.background])
        window = image[top:bottom, left:right]
        fill = np.all(window == np.asarray(COLORS[spec.color], np.uint8), axis=2).mean()
        lo, hi = expected[spec.shape]
        assert lo <= fill <= hi, (spec, fill)
        if spec.shape == "triangle":  # apex up: narrow top row, full bottom row
            mask = np.all(window == np.asarray(COLORS[spec.color], np.uint8), axis=2)
            assert mask[0].sum() <= 2 and mask[-1].all()


def test_render_is_deterministic_in_the_rng() -> None:
    spec = all_specs()[17]
    first = render(spec, np.random.default_rng(42))
    assert np.array_equal(first, render(spec, np.random.default_rng(42)))
    others = [render(spec, np.random.default_rng(s)) for s in range(43, 48)]
    assert any(not np.array_equal(first, other) for other in others)


@pytest.mark.parametrize("image_size", [32, 128])
def test_render_scales_sizes_with_the_image(image_size: int) -> None:
    rng = np.random.default_rng(2)
    scale = image_size / 64
    for spec in all_specs():
        image = render(spec, rng, image_size=image_size)
        assert image.shape == (image_size, image_size, 3)
        top, bottom, _, _ = _foreground_bbox(image, BACKGROUNDS[spec.background])
        lo, hi = SIZES[spec.size]
        assert round(lo * scale) <= bottom - top <= round(hi * scale)


# ----------------------------------------------------------------------------- generate


def test_generate_is_deterministic_and_balanced(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", 120, seed=3)
    again = generate(tmp_path / "b", 120, seed=3)
    other = generate(tmp_path / "c", 120, seed=4)

    assert list(first.columns) == ["path", "caption"] and len(first) == 120
    assert list(first.caption) == list(again.caption)
    assert set(first.caption) == {s.caption for s in all_specs()}
    assert first.caption.value_counts().max() == 2  # one full cycle plus 12
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["images"]
    assert len(list((tmp_path / "a" / "images").iterdir())) == 120

    for i, (path, path_again) in enumerate(zip(first.path, again.path, strict=True)):
        assert Path(path).is_absolute() and Path(path).name == f"{i:06d}.png"
        assert Path(path).read_bytes() == Path(path_again).read_bytes()
    assert list(first.caption) != list(other.caption)
    assert any(
        Path(a).read_bytes() != Path(b).read_bytes()
        for a, b in zip(first.path, other.path, strict=True)
    )

    with Image.open(first.path[0]) as png:
        assert png.size == (64, 64) and png.mode == "RGB"
        pixels = np.asarray(png)
    assert read_attributes(pixels) == vars(parse_caption(first.caption[0]))


# ----------------------------------------------------------------------------- reading


def test_read_attributes_is_exact_on_rendered_images() -> None:
    assert _accuracy(_rendered(5, seed=10)) == 1.0  # 540 images


def test_read_attributes_survives_blur_and_noise() -> None:
    rng = np.random.default_rng(12)
    pairs = [(spec, _blur_noise(image, rng)) for spec, image in _rendered(4, seed=11)]
    assert _accuracy(pairs) >= 0.97


def test_read_attributes_survives_down_and_up_sampling() -> None:
    pairs = [(spec, _down_up(image)) for spec, image in _rendered(4, seed=13)]
    assert _accuracy(pairs) >= 0.97


def test_read_attributes_reads_small_images() -> None:
    rng = np.random.default_rng(14)
    pairs = [(spec, render(spec, rng, image_size=32)) for spec in all_specs()]
    assert _accuracy(pairs) >= 0.97


def test_read_attributes_without_foreground() -> None:
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert read_attributes(blank) == {
        "background": "gray",
        "color": None,
        "shape": None,
        "size": None,
    }


def test_read_attributes_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        read_attributes(np.zeros((64, 64), np.uint8))


# ----------------------------------------------------------------------------- fidelity


def test_prompt_fidelity_is_perfect_on_rendered_images() -> None:
    pairs = _rendered(1, seed=20)
    images = [image for _, image in pairs]
    captions = [spec.caption for spec, _ in pairs]
    scores = prompt_fidelity([*images, images[0]], [*captions, "a photo of a dog"])
    assert scores == {"color": 1.0, "shape": 1.0, "size": 1.0, "background": 1.0, "all": 1.0}


def test_prompt_fidelity_penalises_a_wrong_colour() -> None:
    images, captions = [], []
    for spec, image in _rendered(1, seed=21):
        wrong = "blue" if spec.color == "red" else "red"
        shape_pixels = np.all(image == np.asarray(COLORS[spec.color], np.uint8), axis=2)
        image[shape_pixels] = COLORS[wrong]
        images.append(image)
        captions.append(spec.caption)
    scores = prompt_fidelity(images, captions)
    assert scores["color"] == 0.0 and scores["all"] == 0.0
    assert scores["shape"] == scores["size"] == scores["background"] == 1.0


def test_prompt_fidelity_needs_grammar_captions() -> None:
    image = render(all_specs()[0], np.random.default_rng(0))
    with pytest.raises(ValueError, match="grammar"):
        prompt_fidelity([image], ["a photo of a dog"])
    with pytest.raises(ValueError, match="captions"):
        prompt_fidelity([image, image], [all_specs()[0].caption])

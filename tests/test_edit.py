"""unCLIP's own uses of its latent space: edit (inpainting), interpolate and textdiff, from
`UnCLIP` and from the CLI. Untrained tiny models test the plumbing (kept pixels, ends,
determinism, refusals); a prior and base stage fitted to two shapes64 pictures test that an
edit draws what it is asked, read back by the pixel reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_serving import TINY, build_models

from dalle2.clip import build_scratch_clip
from dalle2.config import load_config
from dalle2.data import shapes64
from dalle2.decoder import Decoder, DecoderStage
from dalle2.edges.cli import main
from dalle2.prior import DiffusionPrior
from dalle2.unclip import UnCLIP

RED = "a large red circle on a white background"
BLUE = "a large blue square on a white background"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("edit") / "models")


def png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


def square_mask(size: int, lo: int, hi: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., lo:hi, lo:hi] = 1
    return mask


def test_an_edit_keeps_every_pixel_outside_the_mask_and_is_deterministic(tiny: Path) -> None:
    unclip = UnCLIP.load(tiny)
    size = unclip.decoder.stages[-1].cfg.image_size
    image = torch.rand(2, 3, size, size)
    mask = square_mask(size, 8, 24).repeat(2, 1, 1, 1)
    edited = unclip.edit(image, mask, [RED, BLUE], seed=1)
    outside = mask.expand_as(image) == 0
    # every stage pastes the kept pixels at its own size, the last one included: exact
    assert torch.equal(edited[outside], image[outside])
    assert (edited - image)[~outside].abs().mean() > 0.05, "the masked region is redrawn"
    assert torch.equal(edited, unclip.edit(image, mask, [RED, BLUE], seed=1))
    assert not torch.equal(edited, unclip.edit(image, mask, [RED, BLUE], seed=2))
    by_reference = unclip.edit(image, mask, references=torch.rand(2, 3, 32, 32), seed=1)
    assert torch.equal(by_reference[outside], image[outside])
    with pytest.raises(ValueError, match="one of the two"):
        unclip.edit(image, mask, seed=1)


def test_interpolation_ends_are_vary_and_text_diffs_start_at_it(tiny: Path) -> None:
    unclip = UnCLIP.load(tiny)
    a, b = torch.rand(3, 32, 32), torch.rand(3, 32, 32)
    row = unclip.interpolate(a, b, num=5, seed=4)
    assert row.shape == (5, 3, 32, 32)
    # the same noise and embedding as vary's; batching 5 rows rounds differently from 1
    for end, source in ((row[0], a), (row[-1], b)):
        assert (end - unclip.vary(source[None], seed=4)[0]).abs().max() < 2 / 255
    assert (row[2] - row[0]).abs().mean() > 1e-3, "the middle is another embedding's image"
    assert torch.equal(row, unclip.interpolate(a, b, num=5, seed=4))
    frames = unclip.textdiff(a, "a red circle", "a blue square", num=3, seed=4)
    assert (frames[0] - unclip.vary(a[None], seed=4)[0]).abs().max() < 2 / 255
    assert torch.equal(frames, unclip.textdiff(a, "a red circle", "a blue square", num=3, seed=4))


def centred(caption: str, size: int) -> np.ndarray:
    """A white (size, size, 3) canvas with the caption's shape in its middle half: a red
    disc or a blue square (shapes64's colours), so both pictures share a white border."""
    spec = shapes64.parse_caption(caption)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    inside = (
        np.hypot(yy, xx) <= size / 4
        if spec.shape == "circle"
        else np.maximum(abs(yy), abs(xx)) <= size / 4
    )
    canvas = np.full((size, size, 3), shapes64.BACKGROUNDS["white"], np.uint8)
    canvas[inside] = shapes64.COLORS[spec.color]
    return canvas


def two_shapes_unclip(steps: int) -> UnCLIP:
    """A one-stage unCLIP fitted to two 16 px pictures: the prior maps each caption to its
    picture's CLIP image embedding, the base stage draws the picture from that embedding."""
    cfg = load_config(TINY)
    torch.manual_seed(0)
    clip = build_scratch_clip(cfg.clip.tower, [RED, BLUE]).eval()
    size = cfg.decoder[0].image_size
    drawn = [centred(c, size) for c in (RED, BLUE)]
    images = torch.from_numpy(np.stack(drawn)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        image_embed = clip.encode_image(images).float()
        enc = clip.encode_text([RED, BLUE], with_tokens=True)
    tokens, mask = enc.tokens, enc.mask
    base = cfg.decoder[0]  # RePaint walks DDIM steps: tiny.yaml's 4 drift in colour
    sample = base.sample.model_copy(update={"steps": 25})
    # keyed by the embedding alone, as test_vary's stage: 300 steps on two pictures do not
    # teach a unet that also reads caption tokens to tell them apart
    unet = base.unet.model_copy(update={"text_token_dim": None})
    stage = DecoderStage(base.model_copy(update={"best_of": 1, "sample": sample, "unet": unet}))
    prior = DiffusionPrior(cfg.prior)
    for model, loss_of in (
        (stage, lambda p: stage.loss(images[p] * 2 - 1, image_embed[p], tokens[p], mask[p])),
        (prior, lambda p: prior.loss(enc.embed[p], image_embed[p], tokens[p], mask[p])),
    ):
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(steps):
            loss = loss_of(torch.randint(0, 2, (8,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return UnCLIP(clip, prior.eval(), Decoder([stage.eval()])).eval()


def test_an_edit_draws_the_prompt_in_the_masked_region() -> None:
    """A white canvas, its middle masked: asked for a red circle the model draws red there,
    asked for a blue square blue, and the border stays white."""
    unclip = two_shapes_unclip(steps=300)
    size = unclip.decoder.stages[-1].cfg.image_size
    image = torch.ones(1, 3, size, size)
    mask = square_mask(size, 2, size - 2)
    for prompt, colour in ((RED, "red"), (BLUE, "blue")):
        edited = unclip.edit(image, mask, [prompt], seed=0)
        hwc = (edited[0].permute(1, 2, 0) * 255).round().byte().numpy()
        read = shapes64.read_attributes(hwc)
        assert (read["background"], read["color"]) == ("white", colour), (prompt, read)


def test_cli_edit_interpolate_and_textdiff_write_their_images(tiny: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = png(tmp_path / "a.png", rng.integers(0, 256, (40, 40, 3)))
    b = png(tmp_path / "b.png", rng.integers(0, 256, (40, 40, 3)))
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 255
    m = png(tmp_path / "mask.png", mask)
    common = ["--checkpoint", str(tiny), "--quiet", "--device", "cpu", "--seed", "2"]
    out = tmp_path / "edit"
    assert main(["edit", str(a), RED, "--mask", str(m), "--out", str(out), *common]) == 0
    edited, source = pixels(out / "0000.png"), pixels(a)
    resized = np.asarray(Image.open(a).resize((32, 32), Image.Resampling.BICUBIC), np.int16)
    keep = np.asarray(Image.open(m).resize((32, 32), Image.Resampling.NEAREST)) == 0
    assert source.shape == (40, 40, 3) and edited.shape == (32, 32, 3)
    # the kept pixels are the input's at the model's size, up to rounding to 8 bits
    assert np.abs(edited - resized)[keep].max() <= 1
    again = tmp_path / "again"
    assert main(["edit", str(a), RED, "--mask", str(m), "--out", str(again), *common]) == 0
    assert np.array_equal(pixels(again / "0000.png"), edited)

    row = tmp_path / "row"
    assert main(["interpolate", str(a), str(b), "--num", "4", "--out", str(row), *common]) == 0
    assert sorted(p.name for p in row.iterdir()) == [f"{i:04d}.png" for i in range(4)]
    varied = tmp_path / "vary"
    assert main(["vary", str(a), "--num", "1", "--out", str(varied), *common]) == 0
    assert np.abs(pixels(row / "0000.png") - pixels(varied / "0000-0.png")).max() <= 2

    diff = tmp_path / "diff"
    argv = ["textdiff", str(a), "--from", RED, "--to", BLUE, "--num", "3", "--out", str(diff)]
    assert main([*argv, *common]) == 0
    assert len(list(diff.glob("*.png"))) == 3


@pytest.mark.parametrize(
    ("mask", "words"),
    [
        (np.full((20, 20), 255, np.uint8), "send a mask of the image's size"),
        (np.full((40, 40), 128, np.uint8), "is not binary"),
        (np.zeros((40, 40), np.uint8), "marks no pixel to redraw"),
        (None, "cannot be read as an image"),
    ],
    ids=["wrong size", "not binary", "empty", "unreadable"],
)
def test_cli_refuses_a_bad_mask_or_image_in_one_sentence(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], mask, words: str
) -> None:
    image = png(tmp_path / "a.png", np.zeros((40, 40, 3), np.uint8))
    if mask is None:
        path = tmp_path / "mask.png"
        path.write_bytes(b"not a png")
    else:
        path = png(tmp_path / "mask.png", mask)
    argv = ["edit", str(image), RED, "--mask", str(path), "--checkpoint", str(tiny), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and err.count("\n") == 0, err
    assert not (tmp_path / "out").exists(), "nothing written"

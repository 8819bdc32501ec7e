"""`dalle2 vary`: a variation keeps its source's CLIP image embedding.

A one-stage decoder trained for 300 steps on two flat colours, red and blue, conditioned on
their CLIP embeddings (a random tiny CLIP still tells the two apart, cosine ~0.9). Then each
variation must sit closer in CLIP space to its own source than to the other. The same check
on the untrained decoder fails: its pictures ignore the embedding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_serving import TINY, build_models

from dalle2.clip import OpenClip, build_scratch_clip
from dalle2.config import load_config
from dalle2.decoder import DecoderStage
from dalle2.edges.cli import main

COLOURS = {"red": (220, 20, 20), "blue": (20, 60, 220)}
NUM = 3


def train_on_two_colours(steps: int) -> tuple[OpenClip, DecoderStage]:
    """tiny.yaml's base stage fitted to flat red and blue images, keyed by their embeddings
    alone (a variation has no caption: the stage here reads none)."""
    cfg = load_config(TINY)
    torch.manual_seed(0)
    clip = build_scratch_clip(cfg.clip.tower, ["a red square", "a blue square"]).eval()
    src = torch.stack(
        [torch.tensor(c).float().div(255).view(3, 1, 1).expand(3, 64, 64) for c in COLOURS.values()]
    )
    with torch.no_grad():
        embed = clip.encode_image(src).float()
    base = cfg.decoder[0]
    stage = DecoderStage(
        base.model_copy(update={"unet": base.unet.model_copy(update={"text_token_dim": None})})
    )
    opt = torch.optim.Adam(stage.parameters(), lr=2e-3)
    for _ in range(steps):
        pick = torch.randint(0, 2, (8,))
        loss = stage.loss(src[pick] * 2 - 1, embed[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clip, stage.eval()


def own_source_is_closest(clip: OpenClip, stage: DecoderStage, tmp: Path) -> bool:
    """Vary both colours through the CLI; True when every variation is nearer its source."""
    models = build_models(tmp / "models", [stage], clip)
    sources = []
    for name, rgb in COLOURS.items():
        path = tmp / f"{name}.png"
        Image.fromarray(np.full((64, 64, 3), rgb, np.uint8)).save(path)
        sources.append(str(path))
    out = tmp / "out"
    argv = ["vary", *sources, "--checkpoint", str(models), "--num", str(NUM), "--out", str(out)]
    assert main([*argv, "--quiet", "--device", "cpu"]) == 0
    table = pd.read_csv(out / "variations.csv")
    assert list(table["source"]) == [s for s in sources for _ in range(NUM)]

    def embed(paths: list[str]) -> torch.Tensor:
        images = torch.stack(
            [torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()) for p in paths]
        )
        with torch.no_grad():
            return F.normalize(clip.encode_image(images.permute(0, 3, 1, 2) / 255).float(), dim=-1)

    sims = embed(list(table["image"])) @ embed(sources).T  # (2 * NUM, 2)
    own = torch.arange(2).repeat_interleave(NUM)
    return bool((sims.argmax(dim=1) == own).all())


@pytest.mark.parametrize(("steps", "expected"), [(300, True), (0, False)])
def test_a_variation_is_closest_to_its_own_source(
    steps: int, expected: bool, tmp_path: Path
) -> None:
    assert own_source_is_closest(*train_on_two_colours(steps), tmp_path) is expected

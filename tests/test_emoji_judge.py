"""The independent emoji judge: captions parsed as the emoji source writes them; trained on a
small dataset of the same grammar, it scores held-out real images near its ceiling and blank
or shuffled images near chance; its cache is keyed by the data snapshot."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import emoji_judge as J
import emoji_screen
import emoji_stages

from dalle2.clip import build_scratch_clip
from dalle2.config import load_config
from dalle2.data.shards import Holdout
from dalle2.decoder import Decoder, DecoderStage
from dalle2.prior import DiffusionPrior
from dalle2.unclip import UnCLIP

REPO = Path(__file__).resolve().parents[1]

SKIN = {
    "light": (250, 220, 190),
    "medium-light": (225, 185, 145),
    "medium": (190, 140, 100),
    "medium-dark": (140, 95, 60),
    "dark": (80, 50, 30),
}


def test_parse_reads_name_style_and_one_tone() -> None:
    assert J.parse("thumbs up: dark skin tone, noto style") == J.Label("thumbs up", "noto", "dark")
    assert J.parse("flag: France, openmoji style") == J.Label("flag: France", "openmoji", "none")
    mixed = J.parse("kiss: woman, man, light skin tone, medium-dark skin tone, fluent style")
    assert mixed == J.Label("kiss: woman, man", "fluent", None)
    same = J.parse("handshake: medium-light skin tone, medium-light skin tone, twemoji style")
    assert same == J.Label("handshake", "twemoji", "medium-light")


def _picture(pattern: np.ndarray, style: str, fill: tuple[int, int, int]) -> np.ndarray:
    """A 64 px emoji-like image: the emoji's 6x6 glyph, drawn in one of four manners."""
    img = np.full((64, 64, 3), 255, np.uint8)
    glyph = np.kron(pattern, np.ones((7, 7), bool))  # 42 px
    box = (slice(11, 53), slice(11, 53))
    if style == "fluent":
        img[8:56, 8:56] = (215, 215, 215)
    if style == "twemoji":
        img[6:58, 6:58] = 0
        img[8:56, 8:56] = 255
    region = img[box]
    region[glyph] = fill
    if style == "openmoji":  # a black outline around the glyph
        edge = glyph & ~(
            np.roll(glyph, 1, 0)
            & np.roll(glyph, -1, 0)
            & np.roll(glyph, 1, 1)
            & np.roll(glyph, -1, 1)
        )
        region[edge] = 0
    return img


def write_emoji_shards(root: Path, num_emoji: int = 40, toned: int = 12) -> Path:
    """Shards of emoji-grammar captions: every emoji in four styles, the first `toned` also in
    five skin tones, written as img2dataset lays out a download."""
    rng = np.random.default_rng(0)
    rows = []
    for e in range(num_emoji):
        pattern = rng.random((6, 6)) < 0.5
        base = tuple(int(c) for c in rng.integers(30, 230, 3))
        for style in J.STYLES:
            rows.append((f"sign {e}, {style} style", _picture(pattern, style, base)))
            if e < toned:
                for tone, rgb in SKIN.items():
                    cap = f"sign {e}: {tone} skin tone, {style} style"
                    rows.append((cap, _picture(pattern, style, rgb)))
    shard_dir = root / "shards"
    shard_dir.mkdir(parents=True)
    with tarfile.open(shard_dir / "00000.tar", "w") as tar:
        for n, (cap, img) in enumerate(rows):
            png = io.BytesIO()
            Image.fromarray(img).save(png, "PNG")
            for ext, blob in (("png", png.getvalue()), ("txt", cap.encode())):
                info = tarfile.TarInfo(f"{n:09d}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return shard_dir


def tiny_config():
    """tiny-emoji.yaml's models, holding out as these shards need (a few dark tones kept)."""
    cfg = load_config(REPO / "tests" / "configs" / "tiny-emoji.yaml")
    rules = [cfg.data.holdout_rules[0].model_copy(update={"fraction": 0.3})]
    data = cfg.data.model_copy(update={"holdout_fraction": 0.15, "holdout_rules": rules})
    return cfg.model_copy(update={"data": data})


HOLDOUT = Holdout.of(tiny_config().data)
SETTINGS = {"epochs": 60, "batch_size": 32, "width": 16}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[J.EmojiJudge, dict, Path]:
    root = tmp_path_factory.mktemp("judge")
    shard_dir = write_emoji_shards(root)
    J.CACHE = root / "cache"
    judge, meta = J.judge_for(shard_dir, HOLDOUT, progress=False, **SETTINGS)
    return judge, meta, shard_dir


def test_judge_trains_on_the_training_split_only(trained: tuple) -> None:
    _, meta, shard_dir = trained
    splits = J.read_splits(shard_dir, HOLDOUT)
    assert set(splits) == {"train", "captions", "dark_tone"}
    assert meta["train_images"] == len(splits["train"].captions)
    held = set(splits["captions"].captions) | set(splits["dark_tone"].captions)
    assert held and not held & set(splits["train"].captions)


def test_real_held_out_images_score_near_the_ceiling_and_controls_near_chance(
    trained: tuple,
) -> None:
    _, meta, _ = trained
    pairs = meta["ceiling"]["captions"]
    real, shuffled, blank = pairs["real"], pairs["shuffled prompts"], pairs["blank"]
    # (emoji, style) pairs never seen together: the emoji is read off its other styles
    assert real["top1"] >= 0.8 and real["style"] >= 0.8
    assert shuffled["top1"] <= 0.2 and blank["top1"] <= 0.2
    assert blank["style"] <= 0.5 and shuffled["style"] <= 0.5
    dark = meta["ceiling"]["dark_tone"]
    # a withheld (emoji, dark tone) pair: tone is read off the other emoji's dark variants
    assert dark["real"]["tone"] >= 0.6 and dark["real"]["toned"] >= 4
    assert dark["blank"]["tone"] <= 0.4


def test_judge_is_cached_by_snapshot_and_scores_a_generate_folder(
    trained: tuple, tmp_path: Path
) -> None:
    judge, meta, shard_dir = trained
    again, meta2 = J.judge_for(shard_dir, HOLDOUT, progress=False, **SETTINGS)
    assert meta2["key"] == meta["key"]
    for a, b in zip(judge.net.state_dict().values(), again.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = Holdout(0.3, "captions", HOLDOUT.rules)
    assert J.snapshot_key(shard_dir, other, **SETTINGS) != meta["key"]

    held = J.read_splits(shard_dir, HOLDOUT)["captions"]
    out = tmp_path / "generated"
    out.mkdir()
    lines = ["prompt,image"]
    for i, (img, cap) in enumerate(zip(held.images, held.captions, strict=True)):
        small = Image.fromarray(img.numpy()).resize((32, 32), Image.BILINEAR)  # a base stage
        small.save(out / f"{i:04d}.png")
        lines.append(f'"{cap}",elsewhere/{i:04d}.png')
    (out / "prompts.csv").write_text("\n".join(lines) + "\n")
    images, prompts = J.read_folder(out)
    assert images.shape[1:] == (32, 32, 3) and prompts == held.captions
    got = J.summary(judge.score(images, prompts))
    assert got["top1"] >= 0.7  # 32 px images are judged as well as 64 px ones, nearly
    with pytest.raises(ValueError, match="images for"):
        judge.score(images[:2], prompts)


def test_stage_table_reads_each_stage_with_the_judge(trained: tuple) -> None:
    """Untrained models: the real images stay at the judge's ceiling, every generated path
    near chance, and each set has every row of the table."""
    judge, _, shard_dir = trained
    cfg = tiny_config()
    torch.manual_seed(0)
    clip = build_scratch_clip(cfg.clip.tower, J.read_splits(shard_dir, HOLDOUT)["train"].captions)
    stages = [DecoderStage(s) for s in cfg.decoder]
    with torch.no_grad():  # unets start with zero outputs
        for param in (p for stage in stages for p in stage.parameters()):
            param.add_(0.05 * torch.randn_like(param))
    unclip = UnCLIP(clip, DiffusionPrior(cfg.prior), Decoder(stages))
    rows = emoji_stages.stage_rows(cfg, unclip, judge, shard_dir, progress=lambda _: None)
    by = {(r["set"], r["path"].split(" (")[0].split(",")[0]): r for r in rows}
    sets = ("unseen_captions", "unseen_dark_tone", "seen_captions")
    paths = ("CLIP retrieval", "real images", "base stage", "cascade", "prior + cascade")
    assert set(by) == {(s, p) for s in sets for p in paths}
    assert by["unseen_captions", "real images"]["top1"] >= 0.8
    for s in sets:
        for p in ("base stage", "cascade", "prior + cascade"):
            assert by[s, p]["top1"] <= 0.25, (s, p)
        assert -1 <= by[s, "prior + cascade"]["prior_cos"] <= 1
    table = emoji_stages.table(rows)
    assert table.count("\n") == len(rows) + 1 and "| unseen_dark_tone | cascade" in table

    emoji_stages.set_sampling(unclip, ["decoder.0.best_of=3", "prior.sample.steps=7"])
    assert unclip.decoder.stages[0].cfg.best_of == 3 and unclip.prior.cfg.sample.steps == 7
    with pytest.raises(SystemExit, match="only sample, best_of change without training"):
        emoji_stages.set_sampling(unclip, ["decoder.0.train.steps=9"])


def test_screen_trains_the_base_unet_and_judges_it_on_true_embeddings(
    trained: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CLIP lever's row: the screen trains that CLIP, embeds the shards with it (reused the
    second time), then trains and judges the base unet on those embeddings."""
    judge, _, shard_dir = trained
    cfg = tiny_config()
    monkeypatch.setattr(emoji_screen, "CLIP_EMBEDDINGS", tmp_path / "emb")
    emb_dir, clip_s = emoji_screen.clip_embeddings(cfg, shard_dir, progress=False)
    assert clip_s > 0 and emb_dir.parent == tmp_path / "emb"
    assert emoji_screen.clip_embeddings(cfg, shard_dir, progress=False) == (emb_dir, 0.0)
    stage, result = emoji_screen.train(cfg, shard_dir, emb_dir, progress=False)
    assert result.final_step == cfg.decoder[0].train.steps and stage.reads_text
    figures = emoji_screen.judge_stage(stage, cfg, shard_dir, emb_dir, judge, guidance=1.0)
    assert set(figures) == {"unseen_captions", "unseen_dark_tone", "seen_captions"}
    assert stage.cfg.sample.guidance_scale == 1.0
    for f in figures.values():
        assert f["prompts"] == cfg.eval.num_prompts and 0 <= f["top5"] <= 1
    row = {"name": "tiny", "steps": 10, "train_s": result.seconds, "figures": figures}
    assert "| tiny | 10 |" in emoji_screen.table([row])

"""Caption retrieval, the memorisation check and the captioned grid: each metric is shown
to score what it should and, in a case built for it, to fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_shard_set
from PIL import ImageFont
from test_clip import TINY  # embed_dim 16, 32 px: builds in well under a second

from dalle2.clip import TextEncoding, build_scratch_clip
from dalle2.config import UnclipConfig
from dalle2.data import shards as D
from dalle2.evaluation import (
    caption_ranks,
    captioned_grid,
    nearest_cosine_distance,
    other_caption_partners,
    retrieval_summary,
    wrap_text,
)
from dalle2.recipes import evaluate as R
from dalle2.unclip import Drawn

NUM = 8  # captions c0..c7 of the stand-in
GREY = 30  # caption cK's image is grey level GREY * K


class ColourClip:
    """A CLIP stand-in that reads exactly: caption "cK" and an image of grey level 30 * K
    both embed to the one-hot vector K, so retrieval's right answer is known."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.one_hot(images[:, 0, 0, 0].long() // GREY, NUM).float()

    def encode_text(self, captions: list[str], with_tokens: bool = False) -> TextEncoding:
        ids = torch.tensor([int(c[1:]) for c in captions])
        return TextEncoding(F.one_hot(ids, NUM).float(), None, None)


def _images(ids: list[int], size: int = 4) -> torch.Tensor:
    """uint8 (N, 3, size, size) flat images of the captions `ids` under ColourClip."""
    grey = torch.tensor(ids, dtype=torch.uint8) * GREY
    return grey[:, None, None, None].expand(-1, 3, size, size).contiguous()


def _reference(train_ids: list[int]) -> R.EvalReference:
    captions = [f"c{k}" for k in range(NUM)]
    embeds = ColourClip().encode_text(captions).embed
    train = ColourClip().encode_image(_images(train_ids).permute(0, 2, 3, 1)).half()
    return R.EvalReference(captions, embeds, train)


# ----------------------------------------------------------------------------- rank math


def test_caption_ranks_count_captions_scoring_at_least_the_target() -> None:
    captions = torch.eye(3)
    images = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.5, 0.3, 0.1]])
    # image 0 -> its caption 0 best; image 1 is nearer caption 1 than 0; image 2's own
    # caption 2 is the worst of three
    assert caption_ranks(images, captions, torch.tensor([0, 0, 2])).tolist() == [1, 2, 3]
    assert caption_ranks(images * 7, captions * 0.1, torch.tensor([0, 1, 0])).tolist() == [1, 1, 1]


def test_a_collapsed_clip_ranks_every_caption_last_not_first() -> None:
    same = torch.ones(5, 4)  # every caption has one embedding: ties count against the image
    ranks = caption_ranks(torch.randn(3, 4), same, torch.tensor([0, 2, 4]))
    assert ranks.tolist() == [5, 5, 5]
    assert retrieval_summary(ranks)["top1"] == 0.0


def test_retrieval_summary_fractions_and_median() -> None:
    out = retrieval_summary(torch.tensor([1, 2, 5, 7]))
    assert out == {"top1": 0.25, "top5": 0.75, "median_rank": 3.5}


def test_floor_partners_are_the_next_prompt_with_another_caption() -> None:
    assert other_caption_partners(["a", "a", "b", "c"]) == [2, 2, 3, 0]
    assert other_caption_partners(["a", "b"]) == [1, 0]
    assert other_caption_partners(["a", "a"]) == []  # no other caption to stand in


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_ranks_right_images_first_and_caption_blind_images_at_chance() -> None:
    ids = list(range(NUM))
    captions = [f"c{k}" for k in ids]
    ref = _reference([0])
    right = R.caption_metrics(
        ColourClip(), _images(ids), _images(ids), captions, ref, split="train"
    )
    assert right["retrieval_top1"] == right["retrieval_top1_real"] == 1.0
    assert right["retrieval_median_rank"] == 1.0
    assert right["retrieval_top1_floor"] == 0.0  # another caption's image never wins
    assert right["retrieval_num_captions"] == NUM

    # a model that ignores its prompt: one image for every prompt wins only its own caption
    blind = R.caption_metrics(
        ColourClip(), _images([3] * NUM), _images(ids), captions, ref, split="train"
    )
    assert blind["retrieval_top1"] == pytest.approx(1 / NUM)
    assert blind["retrieval_top1_real"] == 1.0  # the ceiling is the real images' and stays
    # images of other captions: at the floor
    shifted = R.caption_metrics(
        ColourClip(), _images(ids[1:] + ids[:1]), _images(ids), captions, ref, split="train"
    )
    assert shifted["retrieval_top1"] == shifted["retrieval_top1_floor"] == 0.0
    assert shifted["retrieval_median_rank"] > right["retrieval_median_rank"]


def test_a_prompt_outside_the_dataset_captions_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="not among the embedding shards' captions"):
        R.caption_metrics(
            ColourClip(), _images([0]), _images([0]), ["c9"], _reference([0]), split="train"
        )


# ----------------------------------------------------------------------------- memorisation


def test_nearest_distance_is_zero_for_copies_and_large_for_far_vectors() -> None:
    train = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)).half()
    copies = train[[5, 17, 299]].float() * 3  # the scale of an embedding does not matter
    assert nearest_cosine_distance(copies, train).abs().max() < 1e-3
    wide = torch.cat([train.float(), torch.zeros(300, 16)], dim=1)  # all in the first half
    far = torch.cat([torch.zeros(2, 16), torch.randn(2, 16)], dim=1)  # all in the second
    assert nearest_cosine_distance(far, wide).tolist() == pytest.approx([1.0, 1.0])
    queries = torch.randn(7, 16)
    chunked = nearest_cosine_distance(queries, train, chunk=64)
    assert torch.allclose(chunked, nearest_cosine_distance(queries, train), atol=1e-6)


def test_memorisation_separates_copies_of_training_images_from_new_ones() -> None:
    held = [4, 5, 6, 7]  # captions no training image has
    captions = [f"c{k}" for k in held]
    ref = _reference([0, 1, 2, 3])
    copying = R.caption_metrics(
        ColourClip(), _images([0, 1, 2, 3]), _images(held), captions, ref, split="holdout"
    )
    assert copying["nn_train_distance"] == pytest.approx(0.0, abs=1e-3)
    assert copying["nn_train_distance_real"] == pytest.approx(1.0)
    novel = R.caption_metrics(
        ColourClip(), _images(held), _images(held), captions, ref, split="holdout"
    )
    assert novel["nn_train_distance"] == pytest.approx(novel["nn_train_distance_real"])
    seen = R.caption_metrics(
        ColourClip(), _images([0, 1]), _images([0, 1]), ["c0", "c1"], ref, split="train"
    )
    assert "nn_train_distance_real" not in seen  # real training images are training images


# ----------------------------------------------------------------------------- readers


def test_caption_reader_returns_every_split_distinct_and_stable(tmp_path: Path) -> None:
    _, emb = write_shard_set(tmp_path, shards=3, per_shard=5, captions=4)
    captions = R.read_distinct_captions(emb)
    assert captions == ["c0", "c1", "c2", "c3"] == R.read_distinct_captions(emb)


def test_train_embedding_reader_keeps_training_rows_up_to_the_cap(tmp_path: Path) -> None:
    _, emb = write_shard_set(tmp_path, shards=3, per_shard=5, captions=8)
    holdout = D.Holdout(0.5)
    train = [n for n in range(15) if holdout.keeps("train", f"{n:09d}", f"c{n % 8}")]
    assert 0 < len(train) < 15, "the split of c0..c7 must hold some captions out"
    rows = R.read_train_image_embeds(emb, holdout)
    assert rows.dtype == torch.float16 and rows[:, 0].tolist() == train  # row n is [n, ...]
    assert R.read_train_image_embeds(emb, holdout, limit=2)[:, 0].tolist() == train[:2]


def test_reference_encodes_all_captions_with_a_real_tiny_clip(tmp_path: Path) -> None:
    _, emb = write_shard_set(tmp_path, shards=2, per_shard=6, captions=5, embed_dim=16)
    clip = build_scratch_clip(TINY, [f"c{k}" for k in range(5)])
    cfg = UnclipConfig().model_copy(
        update={"eval": UnclipConfig().eval.model_copy(update={"batch_size": 2})}
    )
    ref = R.eval_reference(cfg, clip, emb, torch.device("cpu"), max_train=4)
    assert ref.captions == [f"c{k}" for k in range(5)]
    assert ref.caption_embeds.shape == (5, 16)
    with torch.no_grad():  # batched encoding gives the embeddings of one batch
        assert torch.allclose(ref.caption_embeds, clip.encode_text(ref.captions).embed, atol=1e-5)
    assert ref.train_embeds.shape == (4, 16)
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    out = R.caption_metrics(clip, images, images, ["c0", "c1", "c2"], ref, split="holdout")
    assert {"retrieval_top1", "retrieval_top5_floor", "retrieval_median_rank_real"} <= set(out)
    assert 1 <= out["retrieval_median_rank"] <= 5


# ----------------------------------------------------------------------------- grid


RED = (255, 0, 0)  # never a pixel of the black, antialiased text


def _text_band(grid: np.ndarray, col: int) -> np.ndarray:
    """The rows under the first cell's generated (red) image, across the first cell."""
    red = np.flatnonzero((grid[:, col] == RED).all(-1))
    return grid[red.max() + 1 :, : grid.shape[1] // 4]


def test_captioned_grid_size() -> None:
    h = w = 16
    gen = np.zeros((5, h, w, 3), np.uint8)
    grid = captioned_grid(gen, gen, list("abcde"), cols=4)
    line = ImageFont.load_default().getbbox("Ag")[3] + 2
    pad = 6
    cell = (2 * 2 * w + pad, 2 * h + pad + 3 * line)  # two images at 2x side by side, 3 lines
    assert grid.size == (4 * (cell[0] + pad) + pad, line + pad + 2 * (cell[1] + pad) + pad)
    assert captioned_grid(gen[:4], gen[:4], list("abcd"), cols=4).height < grid.height


def test_captioned_grid_writes_each_prompt_under_its_pair() -> None:
    gen = np.broadcast_to(np.array(RED, np.uint8), (4, 16, 16, 3)).copy()
    real = np.zeros_like(gen)
    captions = ["a small red circle", "b", "c", "d"]
    col = 6 + 16  # a column through the first generated image

    def band(first: str) -> np.ndarray:
        return _text_band(np.asarray(captioned_grid(gen, real, [first, *captions[1:]])), col)

    text = band(captions[0])
    assert (text < 250).any(), "the prompt is written under its pair"
    assert not np.array_equal(text, band("a large blue square")), "other prompt, other text"
    assert (band("") >= 250).all(), "no prompt, no text under the first pair"


def test_long_prompts_wrap_to_three_lines_ending_in_an_ellipsis() -> None:
    font = ImageFont.load_default()
    lines = wrap_text("thumbs up: medium skin tone, noto style " * 6, font, 120, 3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(font.getlength(t) <= 120 for t in lines)
    broken = wrap_text("a" * 60, font, 50, 3)  # one word wider than the cell
    assert len(broken) == 3 and all(font.getlength(t) <= 50 for t in broken)
    assert wrap_text("short prompt", font, 120, 3) == ["short prompt"]


def test_grid_refuses_mismatched_inputs() -> None:
    gen = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="one of each per prompt"):
        captioned_grid(gen, gen[:1], ["a", "b"])


# ----------------------------------------------------------------------------- wiring


def test_evaluate_reports_the_new_metrics_under_each_split(tmp_path: Path) -> None:
    """The recipe's evaluate, with sampling replaced by the real images: every metric named."""
    captions = [f"c{k}" for k in (1, 2, 3, 4, 5, 6)]
    images = _images([1, 2, 3, 4, 5, 6], size=8)
    pairs = {
        "caption": captions,
        "image": images.permute(0, 2, 3, 1).contiguous(),
        "image_embed": torch.randn(6, 16),
    }

    clip = build_scratch_clip(TINY, captions).eval()

    class RealImages:  # an UnCLIP whose drawings are the real images
        def __init__(self) -> None:
            self.clip = clip

        def to(self, device: torch.device) -> RealImages:
            return self

        def generate(self, prompts: list[str], **kwargs: object) -> Drawn:
            return Drawn(images.float() / 255, torch.randn(len(prompts), 16))

    with torch.no_grad():
        ref = R.EvalReference(
            [f"c{k}" for k in range(NUM)],
            clip.encode_text([f"c{k}" for k in range(NUM)]).embed,
            torch.randn(10, 16).half(),
        )
    cfg = UnclipConfig()
    names = ("", "_real", "_floor")
    retrieval = {f"retrieval_{m}{s}" for m in ("top1", "top5", "median_rank") for s in names}
    for split in ("holdout", "train"):
        out = R.evaluate(
            cfg, RealImages(), pairs, torch.device("cpu"), False, reference=ref, split=split
        )
        assert retrieval | {"nn_train_distance", "clip_score", "prior_cos_true"} <= set(out.metrics)
        assert ("nn_train_distance_real" in out.metrics) == (split == "holdout")
        assert out.generated.shape == out.real.shape == (6, 8, 8, 3)
        assert np.array_equal(out.real, pairs["image"].numpy())


def test_empty_canvas_counts_blank_images_and_dots_but_no_drawn_shape() -> None:
    from dalle2.data import shapes64
    from dalle2.evaluation import empty_canvas

    rng = np.random.default_rng(0)
    for size in (64, 32):  # the base unet's 32 px and the pipeline's 64 px
        drawn = [shapes64.render(spec, rng, size) for spec in shapes64.all_specs()]
        images = torch.from_numpy(np.stack(drawn)).permute(0, 3, 1, 2)
        assert not empty_canvas(images).any(), "a drawn shape (small ones too) is not empty"
        blank = images[:, :, :1, :1].expand_as(images).clone()
        assert empty_canvas(blank).all(), "a canvas of its background colour is empty"
        dot = blank.clone()
        dot[:, :, size // 2 : size // 2 + 2, size // 2 : size // 2 + 2] = 255 - dot[:, :, :1, :1]
        assert empty_canvas(dot).all(), "a 2x2 dot is not a drawn object"

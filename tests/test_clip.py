"""CLIP: the scratch model with a compact token table, and the one loading path for
pretrained weights, exercised with weight files written here."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from dalle2.clip import ClipWeightsError, build_scratch_clip, load_clip, load_pretrained_clip
from dalle2.config import ClipTowerConfig
from dalle2.models import pack_clip, unpack_clip
from dalle2.recipes.clip import negative_loss, word_negatives

TINY = ClipTowerConfig(
    embed_dim=16,
    image_size=32,
    vision_width=32,
    vision_layers=1,
    patch_size=16,
    text_width=32,
    text_layers=1,
    heads=2,
    context_length=16,
)
CAPTIONS = ["a small red circle on a white background", "a large blue square on a gray background"]
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_compact_vocab_keeps_end_token_last_and_encodes() -> None:
    clip = build_scratch_clip(TINY, CAPTIONS)
    assert clip.model.token_embedding.weight.shape[0] == len(clip.vocab) < 30
    ids = clip.tokenize(CAPTIONS)
    assert ids.max() == len(clip.vocab) - 1  # end-of-text is the largest id: argmax pooling works
    enc = clip.encode_text(CAPTIONS, with_tokens=True)
    assert enc.embed.shape == (2, 16) and enc.tokens.shape == (2, 16, 32)
    assert torch.allclose(enc.embed, clip.encode_text(CAPTIONS).embed, atol=1e-5)
    assert enc.mask.sum(1).tolist() == (ids.argmax(1) + 1).tolist()
    images = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    assert clip.encode_image(images).shape == (2, 16)


def test_resnet_image_tower_trains_and_round_trips() -> None:
    cfg = TINY.model_copy(update={"vision_layers": (1, 1, 1, 1), "vision_width": 8})
    clip = build_scratch_clip(cfg, CAPTIONS)
    assert isinstance(clip.model.visual, open_clip.model.ModifiedResNet)
    images = torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8)
    ids = clip.tokenize(CAPTIONS)
    img, txt, scale = clip(images, ids)
    loss = open_clip.ClipLoss()(img, txt, scale)
    loss.backward()
    assert torch.isfinite(loss) and clip.model.visual.conv1.weight.grad.abs().sum() > 0
    clip = clip.eval()
    again = unpack_clip(pack_clip(clip))
    assert isinstance(again.model.visual, open_clip.model.ModifiedResNet)
    assert torch.equal(clip.encode_image(images), again.encode_image(images))


def test_scratch_clip_round_trips_through_files(tmp_path: Path) -> None:
    clip = build_scratch_clip(TINY, CAPTIONS).eval()
    again = unpack_clip(pack_clip(clip))
    for k, v in clip.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    assert torch.equal(clip.encode_text(CAPTIONS).embed, again.encode_text(CAPTIONS).embed)


def tiny_pretrained(tmp_path: Path, name: str) -> tuple[torch.nn.Module, Path]:
    """An open_clip model registered under `name` and its weight file, as a user's
    pretrained CLIP is (no hub: the weights are written here)."""
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / f"{name}.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(cfg_dir)
    reference = open_clip.create_model(name)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, weights)
    return reference, weights


def test_pretrained_by_name_and_local_weight_file(tmp_path: Path) -> None:
    reference, weights = tiny_pretrained(tmp_path, "tiny-test-clip")
    clip = load_pretrained_clip("tiny-test-clip", str(weights))
    for k, v in reference.state_dict().items():
        assert torch.equal(v, clip.model.state_dict()[k]), k
    # the saved form holds the reference, not the weights, and loads through the same code
    again = load_clip(clip.save(tmp_path / "saved") or tmp_path / "saved")
    assert not (tmp_path / "saved" / "clip.safetensors").exists()
    assert torch.equal(again.encode_text(CAPTIONS).embed, clip.encode_text(CAPTIONS).embed)


def test_local_dir_schema(tmp_path: Path) -> None:
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    d = tmp_path / "model"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        d / "open_clip_model.safetensors",
    )
    clip = load_pretrained_clip(f"local-dir:{d}", None)
    assert torch.equal(clip.model.text_projection, model.text_projection)


def test_missing_weights_fail_with_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ClipWeightsError, match="could not load pretrained CLIP 'ViT-B-32'") as e:
        load_pretrained_clip("ViT-B-32", str(tmp_path / "nope.safetensors"))
    assert "\n" not in str(e.value)
    with pytest.raises(ClipWeightsError, match="no CLIP found"):
        load_clip(tmp_path)


SHAPE_CAPTIONS = [
    "a small red circle on a white background",
    "a large blue square on a gray background",
    "a small green triangle on a black background",
    "two words",
]
FIXED = {0, 4, 5, 7}  # "a", "on", "a", "background": the same in every caption of 8 words


@pytest.mark.parametrize("how", ["swap", "replace"])
def test_word_negatives_change_only_the_words_the_batch_varies(how: str) -> None:
    negatives = word_negatives(SHAPE_CAPTIONS, how, torch.Generator().manual_seed(0))
    again = word_negatives(SHAPE_CAPTIONS, how, torch.Generator().manual_seed(0))
    assert negatives == again, "the loader's generator decides, so a resumed run draws the same"
    assert negatives[3] is None, "no other caption of two words: nothing to vary"
    for caption, negative in zip(SHAPE_CAPTIONS[:3], negatives[:3], strict=True):
        assert negative is not None and negative != caption
        old, new = caption.split(), negative.split()
        changed = {k for k, (a, b) in enumerate(zip(old, new, strict=True)) if a != b}
        assert changed and not changed & FIXED, (caption, negative)
        if how == "swap":
            assert sorted(new) == sorted(old) and len(changed) == 2
        else:
            (k,) = changed
            assert new[k] in {c.split()[k] for c in SHAPE_CAPTIONS[:3]}


def test_negative_loss_is_low_when_the_image_prefers_its_caption() -> None:
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    other = img.flip(1)
    scale, valid = torch.tensor(10.0), torch.ones(2)
    right = negative_loss(img, img, other, scale, valid)
    wrong = negative_loss(img, other, img, scale, valid)
    assert right < 0.01 < 10 - 0.01 < wrong
    assert negative_loss(img, other, img, scale, torch.zeros(2)) == 0, "no negative, no loss"

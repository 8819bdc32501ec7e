"""DiffusionPrior and the decoder cascade: training signal, sampling, files round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor

from dalle2.config import (
    DecoderStageConfig,
    DiffusionConfig,
    PriorConfig,
    PriorNetConfig,
    SampleConfig,
    TrainConfig,
    UNetConfig,
)
from dalle2.decoder import Decoder, DecoderStage, gaussian_blur
from dalle2.models import pack_prior, pack_stage, unpack_prior, unpack_stage
from dalle2.networks.unet import UNet
from dalle2.prior import DiffusionPrior
from dalle2.training.trainer import Trainer

UNET = dict(
    dim=8,
    dim_mults=(1, 2),
    num_res_blocks=1,
    heads=2,
    dim_head=8,
    image_embed_dim=16,
    num_image_tokens=2,
    cond_dim=16,
    attn_levels=(1,),
)


def _fit_prior(text: Tensor, image: Tensor, tokens: Tensor | None = None, **net_kw) -> Tensor:
    """Overfit a small prior on 16 fixed pairs for 400 steps; sample it at the same texts."""
    cfg = PriorConfig(
        net=PriorNetConfig(dim=64, depth=2, heads=4, dim_head=16, embed_dim=32, **net_kw),
        diffusion=DiffusionConfig(num_steps=100, prediction="x0"),
        cond_drop_prob=0.0,
        use_text_tokens=tokens is not None,
        train=TrainConfig(
            steps=400,
            batch_size=16,
            lr=2e-3,
            warmup_steps=20,
            ema_decay=0.9,
            precision="fp32",
            log_every=100,
        ),
        sample=SampleConfig(sampler="ddim", steps=20, clamp="none"),
        best_of=1,
    )
    batch = (text, image) if tokens is None else (text, image, tokens)
    trainer = Trainer(DiffusionPrior(cfg), cfg.train, lambda m, b: m.loss(*b), progress=False)
    trainer.fit(iter(lambda: batch, None))
    return trainer.ema.eval().sample(text, tokens, generator=torch.Generator().manual_seed(0))


def test_prior_learns_to_map_16_text_embeddings_to_their_image_embeddings() -> None:
    torch.manual_seed(0)
    text, image = torch.randn(16, 32), torch.randn(16, 32)
    cos = F.cosine_similarity(_fit_prior(text, image), image, dim=-1)
    assert cos.mean() > 0.95, cos


def test_prior_reads_text_tokens_given_as_context() -> None:
    """One text embedding for all 16 targets: only the text tokens tell them apart."""
    torch.manual_seed(0)
    text = torch.randn(1, 32).expand(16, -1)
    tokens, image = torch.randn(16, 5, 8), torch.randn(16, 32)
    pred = _fit_prior(
        text, image, tokens, text_token_dim=8, max_text_len=5, text_tokens_as="context"
    )
    assert F.cosine_similarity(pred, image, dim=-1).mean() > 0.9


def test_prior_best_of_keeps_the_candidate_closest_to_the_text() -> None:
    torch.manual_seed(0)
    cfg = PriorConfig(
        net=PriorNetConfig(dim=32, depth=1, heads=2, dim_head=16, embed_dim=8),
        diffusion=DiffusionConfig(num_steps=20, prediction="x0"),
        sample=SampleConfig(steps=4, clamp="none"),
    )
    prior = DiffusionPrior(cfg).eval()
    text = torch.randn(3, 8)
    one = prior.sample(text, best_of=1, generator=torch.Generator().manual_seed(1))
    four = prior.sample(text, best_of=4, generator=torch.Generator().manual_seed(1))
    assert one.shape == four.shape == (3, 8)
    assert torch.allclose(four.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = lambda e: F.cosine_similarity(e, text, dim=-1)  # noqa: E731
    assert (sim(four) >= sim(one) - 1e-6).all()


def _stages() -> list[DecoderStage]:
    base = DecoderStageConfig(
        image_size=8,
        unet=UNetConfig(**UNET),
        diffusion=DiffusionConfig(num_steps=50, prediction="v"),
        sample=SampleConfig(sampler="dpmpp_2m", steps=3, guidance_scale=2),
    )
    up = DecoderStageConfig(
        image_size=16,
        lowres_size=8,
        unet=UNetConfig(**UNET, lowres_cond=True, fold=2),
        diffusion=DiffusionConfig(num_steps=50),
        random_crop=8,
        sample=SampleConfig(sampler="ddim", steps=2),
    )
    return [DecoderStage(base), DecoderStage(up)]


def test_decoder_stages_train_and_cascade() -> None:
    torch.manual_seed(0)
    stages = _stages()
    images, embed = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 16)
    for stage in stages:
        loss = stage.loss(images, embed)
        loss.backward()
        assert torch.isfinite(loss)
    out, _ = Decoder(stages).eval().sample(embed, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 16, 16) and out.min() >= 0 and out.max() <= 1


def test_stage_best_of_keeps_the_candidate_clip_puts_closest_to_the_caption() -> None:
    """best_of 4: each caption's four images come from its own generator and the one whose
    (stand-in) CLIP embedding is nearest the caption's is kept; with no text embedding to
    rank by, the stage draws one image, as with best_of 1."""
    torch.manual_seed(0)
    base, up = _stages()
    torch.nn.init.normal_(base.unet.out_conv.weight, std=0.3)  # zero-init: make it draw
    base.cfg = base.cfg.model_copy(update={"best_of": 4})
    decoder, embed = Decoder([base]).eval(), torch.randn(2, 16)

    def brightness(images: Tensor) -> Tensor:  # (N, 3, h, w) in [0, 1] -> (N, 2)
        m = images.mean((1, 2, 3))
        return torch.stack([m, 1 - m], dim=-1)

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in (1, 2)]

    candidates = (base.sample(embed.repeat_interleave(4, 0), generator=gens()) + 1) / 2
    means = candidates.mean((1, 2, 3)).view(2, 4)
    assert (means.argmax(1) != means.argmin(1)).all()
    for direction, pick in (([1.0, 0.0], means.argmax(1)), ([0.0, 1.0], means.argmin(1))):
        text = torch.tensor([direction, direction])
        out, kept = decoder.sample(
            embed, generator=gens(), text_embed=text, encode_image=brightness
        )
        assert torch.equal(out, candidates.view(2, 4, 3, 8, 8)[torch.arange(2), pick])
        assert torch.equal(kept, embed)
    unranked, _ = decoder.sample(embed, generator=torch.Generator().manual_seed(0))
    base.cfg = base.cfg.model_copy(update={"best_of": 1})
    again, _ = decoder.sample(embed, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unranked, again)
    cascade = Decoder([base, up]).eval()
    base.cfg = base.cfg.model_copy(update={"best_of": 3})
    drawn, _ = cascade.sample(embed, text_embed=torch.randn(2, 2), encode_image=brightness)
    assert drawn.shape == (2, 3, 16, 16)


def test_stage_best_of_draws_one_image_from_each_candidate_embedding() -> None:
    """Given (B, n, E) candidate embeddings (the prior's draws), a best_of n stage draws one
    image from each, keeps the one CLIP ranks first and hands on the embedding it came
    from; candidates that do not match its best_of are refused."""
    torch.manual_seed(0)
    base, up = _stages()
    torch.nn.init.normal_(base.unet.out_conv.weight, std=0.3)
    base.cfg = base.cfg.model_copy(update={"best_of": 3})
    cands = torch.randn(2, 3, 16)

    def brightness(images: Tensor) -> Tensor:
        m = images.mean((1, 2, 3))
        return torch.stack([m, 1 - m], dim=-1)

    gen = [torch.Generator().manual_seed(s) for s in (1, 2)]
    each = (base.sample(cands.flatten(0, 1), generator=gen) + 1) / 2
    pick = torch.arange(2), each.mean((1, 2, 3)).view(2, 3).argmax(1)
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    gen = [torch.Generator().manual_seed(s) for s in (1, 2)]
    decoder = Decoder([base]).eval()
    out, kept = decoder.sample(cands, generator=gen, text_embed=text, encode_image=brightness)
    assert torch.equal(out, each.view(2, 3, 3, 8, 8)[pick])
    assert torch.equal(kept, cands[pick])
    cascade = Decoder([base, up]).eval()
    drawn, kept = cascade.sample(cands, text_embed=text, encode_image=brightness)
    assert drawn.shape == (2, 3, 16, 16) and kept.shape == (2, 16)
    with pytest.raises(ValueError, match="3 candidate embeddings a caption"):
        decoder.sample(cands)


def test_decoder_stage_draws_what_the_caption_tokens_say() -> None:
    """One image embedding for four flat colours: only the caption tokens tell them apart."""
    torch.manual_seed(0)
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])
    images = colours[:, :, None, None].expand(-1, -1, 8, 8).contiguous()
    embed = torch.randn(1, 16).expand(4, -1)
    tokens, mask = torch.randn(4, 3, 8), torch.ones(4, 3, dtype=torch.bool)
    cfg = DecoderStageConfig(
        image_size=8,
        unet=UNetConfig(**UNET, text_token_dim=8),
        diffusion=DiffusionConfig(num_steps=100, prediction="x0"),
        cond_drop_prob=0.0,
        text_drop_prob=0.0,
        train=TrainConfig(
            steps=300, batch_size=4, lr=3e-3, warmup_steps=10, ema_decay=0.9, precision="fp32"
        ),
        sample=SampleConfig(sampler="ddim", steps=10, guidance_scale=1.0),
    )
    batch = (images, embed, tokens, mask)
    trainer = Trainer(DecoderStage(cfg), cfg.train, lambda m, b: m.loss(*b), progress=False)
    trainer.fit(iter(lambda: batch, None))
    stage = trainer.ema.eval()
    gen = torch.Generator().manual_seed(0)
    drawn = stage.sample(embed, text_tokens=tokens, text_mask=mask, generator=gen).mean((2, 3))
    assert (torch.cdist(drawn, colours).argmin(dim=1) == torch.arange(4)).all(), drawn


def test_embed_noise_moves_training_embeddings_within_its_radius_and_only_then() -> None:
    """embed_noise: 0 hands the unet the embeddings as they are; above 0 each moves off
    itself by at most the radius."""
    unit = F.normalize(torch.randn(256, 16), dim=-1)
    stage = DecoderStage(DecoderStageConfig(image_size=8, unet=UNetConfig(**UNET), embed_noise=0.6))
    moved = stage._perturb(unit)
    cos = F.cosine_similarity(moved, unit, dim=-1)
    assert cos.min() >= (1 - 0.6**2) ** 0.5 - 1e-4 and cos.max() <= 1 + 1e-5  # |noise| <= 0.6
    assert cos.min() < 0.9 and cos.max() > 0.99  # radii spread from ~0 to 0.6
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x: Tensor, t: Tensor, embed: Tensor, *args, **kwargs) -> Tensor:
            seen.append(embed)
            return torch.zeros_like(x)

    images = torch.zeros(4, 3, 8, 8)
    for noise in (0.0, 0.6):
        stage = DecoderStage(
            DecoderStageConfig(image_size=8, unet=UNetConfig(**UNET), embed_noise=noise)
        )
        stage.unet = Spy()
        torch.manual_seed(0)
        stage.loss(images, unit[:4])
    exact = F.normalize(unit[:4], dim=-1) * 4  # scale_embed: sqrt(16)
    assert torch.allclose(seen[0], exact) and not torch.allclose(seen[1], exact)


def test_embed_drop_hides_the_image_embedding_alone() -> None:
    """drop_embed: the unet's output no longer depends on the image embedding but still
    on the caption tokens; the stage draws it at embed_drop_prob, and only a text-reading
    unet may ask for it."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(**UNET, text_token_dim=8))
    torch.nn.init.normal_(unet.out_conv.weight, std=0.1)  # zero-initialised: make it speak
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    a, b = torch.randn(2, 16), torch.randn(2, 16)
    tokens, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    hide = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        out = [
            unet(x, t, e, text_tokens=tok, text_mask=mask, drop_embed=hide)
            for e, tok in ((a, tokens), (b, tokens), (a, -tokens))
        ]
        shown = unet(x, t, b, text_tokens=tokens, text_mask=mask)
    assert torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])
    assert not torch.allclose(out[1], shown)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
            seen.append(kwargs.get("drop_embed"))
            return torch.zeros_like(x)

    cfg = DecoderStageConfig(
        image_size=8, unet=UNetConfig(**UNET, text_token_dim=8), embed_drop_prob=0.3
    )
    stage = DecoderStage(cfg)
    stage.unet = Spy()
    stage.loss(torch.zeros(4000, 3, 8, 8), torch.randn(4000, 16), torch.randn(4000, 3, 8))
    assert 0.27 < seen[0].float().mean() < 0.33
    with pytest.raises(ValidationError, match="embed_drop_prob needs a unet"):
        DecoderStageConfig(image_size=8, unet=UNetConfig(**UNET), embed_drop_prob=0.3)


def test_blur_keeps_flat_images_flat_and_smooths_edges() -> None:
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.5, 1.0])), flat, atol=1e-6)
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 1
    blurred = gaussian_blur(edge, torch.tensor([1.0]))
    assert 0 < blurred[0, 0, 0, 3] < 0.5 < blurred[0, 0, 0, 4] < 1


def test_models_round_trip_bit_exact_through_files() -> None:
    stage = _stages()[1]
    index, again = unpack_stage(pack_stage(stage, 1))
    assert index == 1 and again.cfg == stage.cfg
    for k, v in stage.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    prior = DiffusionPrior(PriorConfig(net=PriorNetConfig(dim=32, depth=1, embed_dim=8)))
    back = unpack_prior(pack_prior(prior))
    for k, v in prior.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k

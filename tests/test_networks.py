"""Network shapes, conditioning contracts, bf16 autocast, and small overfitting checks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dalle2.config import PriorNetConfig, UNetConfig
from dalle2.networks import PriorTransformer, UNet
from dalle2.networks.layers import num_groups

TINY = dict(
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


@pytest.mark.parametrize("fold", [1, 2])
@pytest.mark.parametrize("lowres", [False, True])
@pytest.mark.parametrize("learned_variance", [False, True])
@pytest.mark.parametrize("layout", ["classic", "efficient"])
def test_unet_shapes(fold: int, lowres: bool, learned_variance: bool, layout: str) -> None:
    cfg = UNetConfig(
        **TINY, fold=fold, lowres_cond=lowres, learned_variance=learned_variance, layout=layout
    )
    net = UNet(cfg)
    x = torch.randn(2, 3, 16, 16)
    low = torch.randn(2, 3, 16, 16) if lowres else None
    out = net(x, torch.tensor([3, 500]), torch.randn(2, 16), low, torch.rand(2) if lowres else None)
    assert out.shape == (2, 6 if learned_variance else 3, 16, 16)


@pytest.mark.parametrize(
    ("channels", "groups"), [(3, 1), (8, 2), (16, 4), (32, 8), (48, 12), (128, 32), (512, 32)]
)
def test_group_norm_never_degenerates_to_instance_norm(channels: int, groups: int) -> None:
    assert num_groups(channels) == groups and channels % groups == 0


def test_unet_lowres_contract_is_checked() -> None:
    up = UNet(UNetConfig(**TINY, lowres_cond=True))
    with pytest.raises(ValueError, match="low"):
        up(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.randn(1, 16))


def test_unet_dropped_condition_ignores_the_embedding() -> None:
    torch.manual_seed(0)
    net = UNet(UNetConfig(**TINY))
    for p in net.parameters():  # leave the zero-initialised output conv behind
        p.data.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 10])
    e1, e2 = torch.randn(2, 16), torch.randn(2, 16)
    drop = torch.tensor([True, True])
    assert torch.allclose(net(x, t, e1, drop_cond=drop), net(x, t, e2, drop_cond=drop), atol=1e-6)
    assert not torch.allclose(net(x, t, e1), net(x, t, e2), atol=1e-4)


@pytest.mark.parametrize("num_image_tokens", [0, 2])
def test_unet_reads_the_caption_tokens_it_may_see(num_image_tokens: int) -> None:
    torch.manual_seed(0)
    net = UNet(UNetConfig(**{**TINY, "num_image_tokens": num_image_tokens}, text_token_dim=8))
    for p in net.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    x, t, e = torch.randn(2, 3, 16, 16), torch.tensor([10, 10]), torch.randn(2, 16)
    tokens, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    padded = tokens.clone()
    padded[:, 3:] = torch.randn(2, 2, 8)  # only where the mask hides them
    out = net(x, t, e, text_tokens=tokens, text_mask=mask)
    assert torch.allclose(out, net(x, t, e, text_tokens=padded, text_mask=mask), atol=1e-6)
    assert not torch.allclose(out, net(x, t, e, text_tokens=torch.randn(2, 5, 8), text_mask=mask))
    no_text = net(x, t, e)
    drop = torch.tensor([True, True])
    dropped = net(x, t, e, text_tokens=tokens, text_mask=mask, drop_text=drop)
    assert torch.allclose(dropped, no_text, atol=1e-6) and not torch.allclose(out, no_text)
    null = net(x, t, torch.randn(2, 16), text_tokens=tokens, drop_cond=drop)
    assert torch.allclose(null, net(x, t, e, drop_cond=drop), atol=1e-6)
    with pytest.raises(ValueError, match="reads no text"):
        UNet(UNetConfig(**TINY))(x, t, e, text_tokens=tokens)


def test_unet_bf16_autocast_forward_backward_is_finite() -> None:
    net = UNet(UNetConfig(**TINY, fold=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.randn(2, 16))
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def _flops(forward: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one forward + backward, counted by torch (under the math attention kernel:
    the counter has no formula for the fused CPU kernel and would count attention as 0)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        forward().sum().backward()
    return counter.get_total_flops()


def _unet_flops(net: UNet, size: int) -> int:
    return _flops(lambda: net(torch.randn(1, 3, size, size), torch.tensor([5]), torch.randn(1, 16)))


def test_efficient_layout_narrows_the_down_path_and_merges_skips_1x1() -> None:
    wide = dict(TINY, dim_mults=(1, 2, 4), attn_levels=())
    classic, efficient = UNet(UNetConfig(**wide)), UNet(UNetConfig(**wide, layout="efficient"))
    # classic keeps the parameter names of earlier checkpoints: nothing to merge or widen
    assert not any(k.startswith("widen") or ".merges." in k for k in classic.state_dict())
    # down level i runs at level i-1's width (8, 8, 16); up level i still at i's (32, 16, 8)
    assert [lv.blocks[0].conv1.in_channels for lv in efficient.downs] == [8, 8, 16]
    assert [lv.blocks[0].conv1.in_channels for lv in efficient.ups] == [32, 16, 8]
    assert [lv.merges[0].kernel_size for lv in efficient.ups] == [(1, 1)] * 3
    assert _unet_flops(efficient, 32) < 0.8 * _unet_flops(classic, 32)


@pytest.mark.parametrize("layout", ["classic", "efficient"])
def test_unet_overfits_one_batch(layout: str) -> None:
    torch.manual_seed(0)
    net = UNet(UNetConfig(**TINY, layout=layout))
    x, t, e = torch.randn(4, 3, 16, 16), torch.full((4,), 100), torch.randn(4, 16)
    target = torch.randn(4, 3, 16, 16).clamp(-1, 1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = F.mse_loss(net(x, t, e), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10


def _prior(**kw) -> PriorTransformer:
    return PriorTransformer(
        PriorNetConfig(dim=32, depth=2, heads=2, dim_head=16, embed_dim=16, **kw)
    )


@pytest.mark.parametrize("text_tokens_as", ["sequence", "context"])
def test_prior_shapes_and_padding_mask(text_tokens_as: str) -> None:
    torch.manual_seed(0)
    net = _prior(text_token_dim=8, max_text_len=6, text_tokens_as=text_tokens_as).eval()
    x, t, e = torch.randn(2, 16), torch.tensor([1, 2]), torch.randn(2, 16)
    tokens = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 3 + [False] * 3] * 2)
    out = net(x, t, e, tokens, mask)
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    changed = tokens.clone()
    changed[:, 3:] = torch.randn(2, 3, 8) * 10  # only padded positions change
    assert torch.allclose(out, net(x, t, e, changed, mask), atol=1e-5)
    assert not torch.allclose(out, net(x, t, e, tokens * 2, mask), atol=1e-4)


@pytest.mark.parametrize("text_tokens_as", ["sequence", "context"])
def test_prior_dropped_text_ignores_text(text_tokens_as: str) -> None:
    torch.manual_seed(0)
    net = _prior(text_token_dim=8, max_text_len=4, text_tokens_as=text_tokens_as).eval()
    x, t = torch.randn(2, 16), torch.tensor([5, 5])
    drop = torch.tensor([True, True])
    a = net(x, t, torch.randn(2, 16), torch.randn(2, 4, 8), drop_text=drop)
    b = net(x, t, torch.randn(2, 16), torch.randn(2, 4, 8), drop_text=drop)
    assert torch.allclose(a, b, atol=1e-5)


def test_prior_bf16_autocast_is_finite() -> None:
    net = _prior()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(3, 16), torch.tensor([1, 2, 3]), torch.randn(3, 16))
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_prior_text_tokens_as_context_cost_a_fraction_of_the_sequence() -> None:
    def flops(text_tokens_as: str) -> int:
        net = _prior(text_token_dim=8, max_text_len=77, text_tokens_as=text_tokens_as)
        x, t, e, tokens = (
            torch.randn(4, 16),
            torch.arange(4),
            torch.randn(4, 16),
            torch.randn(4, 77, 8),
        )
        return _flops(lambda: net(x, t, e, tokens))

    assert flops("context") < flops("sequence") / 3

"""Small building blocks shared by the UNet and the prior transformer.

Nothing here knows about diffusion: timesteps are just numbers to embed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of (possibly fractional) timesteps (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([args.cos(), args.sin()], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features followed by a two-layer MLP, so the net can warp the time axis."""

    def __init__(self, freq_dim: int, out_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
        )

    def forward(self, t: Tensor) -> Tensor:
        """(B,) timesteps -> (B, out_dim)."""
        return self.mlp(timestep_embedding(t, self.freq_dim))


class Attention(nn.Module):
    """Multi-head attention through SDPA, with optional context tokens.

    Context tokens (cross-attention) are projected to keys and values and concatenated in
    front of the sequence's own keys and values, so self- and cross-attention share one
    SDPA call (the "encoder_kv" trick of improved-diffusion / GLIDE).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dropout = dropout
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)  # one fused matmul for q, k, v
        self.to_context_kv = (
            nn.Linear(context_dim, 2 * inner, bias=False) if context_dim is not None else None
        )
        self.to_out = nn.Linear(inner, dim)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        last_only: bool = False,
    ) -> Tensor:
        """(B, T, dim) -> (B, T, dim); `attn_mask` is a bool (B, 1, T, S), True = may attend.

        `last_only` answers for the last position alone, (B, 1, dim), which sees every key:
        a causal readout that needs one row skips the other T - 1 queries.
        """
        q, k, v = rearrange(
            self.to_qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads
        )  # each (B, nh, T, hs)
        if last_only:
            q = q[:, :, -1:]  # (B, nh, 1, hs)
            is_causal = False  # SDPA aligns causality top-left; the last row sees all anyway
        if context is not None:
            if self.to_context_kv is None:
                raise ValueError("this attention layer was built without context_dim")
            ck, cv = rearrange(
                self.to_context_kv(context), "b s (two h d) -> two b h s d", two=2, h=self.heads
            )  # each (B, nh, S, hs)
            k = torch.cat([ck, k], dim=2)  # (B, nh, S + T, hs)
            v = torch.cat([cv, v], dim=2)  # (B, nh, S + T, hs)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, nh, T, hs)
        return self.to_out(rearrange(out, "b h t d -> b t (h d)"))  # (B, T, dim)


class FeedForward(nn.Module):
    """Transformer MLP: SwiGLU (Shazeer 2020) by default, or plain GELU."""

    def __init__(self, dim: int, mult: int = 4, swiglu: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = dim * mult
        self.swiglu = swiglu
        self.proj_in = nn.Linear(dim, 2 * hidden if swiglu else hidden)  # fused value + gate
        self.drop = nn.Dropout(dropout)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, dim) -> (B, T, dim)."""
        h = self.proj_in(x)  # (B, T, 2 * hidden) or (B, T, hidden)
        if self.swiglu:
            value, gate = h.chunk(2, dim=-1)  # each (B, T, hidden)
            h = value * F.silu(gate)
        else:
            h = F.gelu(h)
        return self.proj_out(self.drop(h))


def num_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """Most GroupNorm groups (<= max_groups, each >= min_group_size channels) dividing `channels`.

    One channel per group would be instance norm, which erases every channel's spatial mean
    (a flat background's colour, say) at the narrow widths of small CPU models.
    """
    for g in range(min(max_groups, max(channels // min_group_size, 1)), 0, -1):
        if channels % g == 0:
            return g
    return 1


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with as many groups as possible, up to 32 (Wu & He 2018)."""
    return nn.GroupNorm(num_groups(channels), channels)


class ResBlock(nn.Module):
    """Pre-activation residual conv block; the embedding scales and shifts the second norm.

    Scale-shift (FiLM) conditioning after GroupNorm is the "AdaGN" of Dhariwal & Nichol 2021.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """(B, in_ch, H, W), (B, emb_dim) already activated -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        scale, shift = rearrange(self.emb(emb), "b (two c) -> two b c 1 1", two=2)  # (B, C, 1, 1)
        h = torch.addcmul(shift, self.norm2(h), scale + 1)  # norm(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))  # (B, out_ch, H, W)
        return self.skip(x) + h


class SpatialAttention(nn.Module):
    """Self-attention over the pixels of a feature map, optionally also over context tokens."""

    def __init__(self, ch: int, heads: int, dim_head: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.norm = group_norm(ch)
        self.attn = Attention(ch, heads, dim_head, context_dim=context_dim)

    def forward(
        self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """(B, C, H, W), optional (B, S, context_dim) and (B, S) bool (True = may be read)
        -> (B, C, H, W)."""
        h, w = x.shape[2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, HW, C)
        attn_mask = None
        if context_mask is not None:  # context keys come first, then every pixel's own
            pixels = context_mask.new_ones(x.shape[0], h * w)
            attn_mask = torch.cat([context_mask, pixels], dim=1)[:, None, None]  # (B,1,1,S+HW)
        out = self.attn(tokens, context, attn_mask)  # (B, HW, C)
        return x + rearrange(out, "b (h w) c -> b c h w", h=h)


class Downsample(nn.Module):
    """Halve resolution with a 2x2 stride-2 conv (= pixel-unshuffle then 1x1 conv): no info lost."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_ch, H, W) -> (B, out_ch, H / 2, W / 2)."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double resolution with a 1x1 conv and pixel-shuffle, initialised to nearest upsampling.

    Giving the four sub-pixels identical initial weights (ICNR, Aitken et al. 2017) avoids
    the checkerboard artefacts of a randomly initialised sub-pixel conv.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch * 4, 1)
        with torch.no_grad():
            base = nn.Conv2d(in_ch, out_ch, 1)
            self.conv.weight.copy_(base.weight.repeat_interleave(4, dim=0))
            self.conv.bias.copy_(base.bias.repeat_interleave(4, dim=0))

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_ch, H, W) -> (B, out_ch, 2H, 2W)."""
        return F.pixel_shuffle(self.conv(x), 2)

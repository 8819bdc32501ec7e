"""The decoder's image denoiser: a unet conditioned on time and a CLIP image embedding.

The embedding enters twice (as in unCLIP): added to the time embedding, and as a few
context tokens that attention layers cross-attend to. Upsampler stages also get the
previous stage's image, concatenated to the input. `fold` pixel-unshuffles the input so
that a 32px stage convolves at 16px, for a large speedup at the same receptive field.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dalle2.config import UNetConfig
from dalle2.networks.layers import Attention, TimeMLP, group_norm


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning vector as scale and shift."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = group_norm(cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return h + self.skip(x)


class AttnBlock(nn.Module):
    """Self-attention over pixels, then cross-attention to the context tokens (if any)."""

    def __init__(self, ch: int, heads: int, dim_head: int, context_dim: int | None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(ch)
        self.attn = Attention(ch, heads, dim_head)
        self.cross = None
        if context_dim is not None:
            self.cross_norm = nn.LayerNorm(ch)
            self.cross = Attention(ch, heads, dim_head, context_dim=context_dim)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(x, "b c h w -> b (h w) c")
        tokens = tokens + self.attn(self.norm(tokens))
        if self.cross is not None and context is not None:
            tokens = tokens + self.cross(self.cross_norm(tokens), context)
        return rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w)


class Level(nn.Module):
    """Resnet blocks of one resolution, each optionally followed by attention."""

    def __init__(self, blocks: list[ResBlock], attns: list[AttnBlock | None]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList([a if a is not None else nn.Identity() for a in attns])


class UNet(nn.Module):
    """Denoiser for one decoder stage; see the module docstring."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        f2 = cfg.fold**2
        in_ch = cfg.in_channels * (2 if cfg.lowres_cond else 1) * f2
        out_ch = cfg.in_channels * (2 if cfg.learned_variance else 1)
        emb_dim = cfg.dim * 4
        chans = [cfg.dim * m for m in cfg.dim_mults]
        ctx = cfg.cond_dim if cfg.num_image_tokens > 0 else None

        self.time = TimeMLP(cfg.dim, emb_dim)
        self.embed_to_emb = nn.Linear(cfg.image_embed_dim, emb_dim)
        self.null_emb = nn.Parameter(torch.zeros(emb_dim))
        if cfg.lowres_cond:
            self.aug_time = TimeMLP(cfg.dim, emb_dim)
        if ctx is not None:
            self.embed_to_tokens = nn.Linear(cfg.image_embed_dim, cfg.num_image_tokens * ctx)
            self.null_tokens = nn.Parameter(torch.randn(cfg.num_image_tokens, ctx) * 0.02)
            self.context_norm = nn.LayerNorm(ctx)

        def attn(level: int, ch: int) -> AttnBlock | None:
            if level not in cfg.attn_levels:
                return None
            return AttnBlock(ch, cfg.heads, cfg.dim_head, ctx)

        self.init_conv = nn.Conv2d(in_ch, cfg.dim, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch, skips = cfg.dim, []
        for i, c in enumerate(chans):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, c, emb_dim, cfg.dropout))
                ch = c
                skips.append(ch)
            self.down.append(Level(blocks, [attn(i, c) for _ in blocks]))
            last = i == len(chans) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, 2, 1))
        self.mid1 = ResBlock(ch, ch, emb_dim, cfg.dropout)
        self.mid_attn = AttnBlock(ch, cfg.heads, cfg.dim_head, ctx)
        self.mid2 = ResBlock(ch, ch, emb_dim, cfg.dropout)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, c in reversed(list(enumerate(chans))):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch + skips.pop(), c, emb_dim, cfg.dropout))
                ch = c
            self.up.append(Level(blocks, [attn(i, c) for _ in blocks]))
            self.upsample.append(
                nn.Identity()
                if i == 0
                else nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)
                )
            )
        self.out_norm = group_norm(ch)
        self.out_conv = nn.Conv2d(ch, out_ch * f2, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def _conditioning(
        self, t: Tensor, image_embed: Tensor, aug: Tensor | None, drop: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        b = t.shape[0]
        emb_from_image = self.embed_to_emb(image_embed)  # (B, emb)
        tokens = None
        if self.cfg.num_image_tokens > 0:
            tokens = rearrange(
                self.embed_to_tokens(image_embed), "b (n d) -> b n d", n=self.cfg.num_image_tokens
            )
        if drop is not None:
            keep = (~drop).to(emb_from_image.dtype)[:, None]
            emb_from_image = emb_from_image * keep + self.null_emb.to(emb_from_image.dtype) * (
                1 - keep
            )
            if tokens is not None:
                null = self.null_tokens.to(tokens.dtype).expand(b, -1, -1)
                tokens = torch.where(drop[:, None, None], null, tokens)
        emb = self.time(t) + emb_from_image
        if self.cfg.lowres_cond:
            level = aug if aug is not None else torch.zeros(b, device=t.device)
            emb = emb + self.aug_time(level * 1000)
        if tokens is not None:
            tokens = self.context_norm(tokens)
        return emb, tokens

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        image_embed: Tensor,
        lowres: Tensor | None = None,
        lowres_aug_level: Tensor | None = None,
        drop_cond: Tensor | None = None,
    ) -> Tensor:
        """(B, C, H, W) -> (B, C or 2C, H, W); see UNetConfig for the conditioning."""
        if self.cfg.lowres_cond:
            if lowres is None:
                raise ValueError("this unet is an upsampler: pass the low-res image as `lowres`")
            x = torch.cat([x, lowres.to(x.dtype)], dim=1)
        elif lowres is not None:
            raise ValueError("this unet takes no low-res image (unet.lowres_cond is false)")
        f = self.cfg.fold
        if f > 1:
            x = F.pixel_unshuffle(x, f)  # (B, C*f*f, H/f, W/f)
        emb, context = self._conditioning(t, image_embed, lowres_aug_level, drop_cond)
        h = self.init_conv(x)
        skips = []
        for level, down in zip(self.down, self.downsample, strict=True):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = block(h, emb)
                h = attn(h, context) if isinstance(attn, AttnBlock) else h
                skips.append(h)
            h = down(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb), context), emb)
        for level, up in zip(self.up, self.upsample, strict=True):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
                h = attn(h, context) if isinstance(attn, AttnBlock) else h
            h = up(h)
        out = self.out_conv(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(out, f) if f > 1 else out

"""The decoder's image denoiser: a UNet conditioned on time and a CLIP image embedding.

The image embedding enters twice, as in unCLIP (Ramesh et al. 2022): added to the time
embedding (scale-shift in every resblock), and as a few context tokens that the attention
blocks attend to. With `text_token_dim`, CLIP's per-token caption encodings join those
context tokens (GLIDE's and DALL-E 2's text conditioning), after a learned null token that
stands for "no caption" when it is dropped or absent. Upsampler stages also get the previous
stage's image concatenated to the input. `fold` pixel-unshuffles the input so that, e.g., a
32px stage convolves at 16px.

Layout: level i works at resolution H / fold / 2**i; its up path (decoder) has
C_i = dim * dim_mults[i] channels. Channel changes happen in the down/up-samplers, so the
resblocks need no 1x1 shortcut convs. Two layouts (`UNetConfig.layout`):
- "classic" (improved-diffusion): the down path also runs at C_i, and each up block takes
  its skip concatenated, so its 3x3 convs read 2 * C_i channels.
- "efficient" (Imagen's Efficient U-Net; DALLE2-pytorch's Unet is built this way): the down
  path carries the previous level's width C_{i-1}, and each up block first merges
  [h, skip] with a 1x1 conv, so every 3x3 conv reads C_i channels. At dim 64, mults
  (1, 2, 4, 8), 64 px, a training step costs ~27 GFLOP per image against ~44 for
  "classic"; on a CPU, convolutions are nearly all of the time.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dalle2.config import UNetConfig
from dalle2.networks.layers import (
    Downsample,
    ResBlock,
    SpatialAttention,
    TimestepEmbedding,
    Upsample,
    group_norm,
)


class Level(nn.Module):
    """The resblocks of one resolution, each followed by attention when the level has it."""

    def __init__(
        self,
        in_chs: list[int],
        ch: int,
        emb_dim: int,
        dropout: float,
        attn: bool,
        heads: int,
        dim_head: int,
        context_dim: int | None,
        merge_ch: int | None = None,
    ) -> None:
        super().__init__()
        # up path of the "efficient" layout: 1x1 conv from [h, skip] (merge_ch) to in_chs
        self.merges = nn.ModuleList(
            nn.Conv2d(merge_ch, c, 1) for c in in_chs if merge_ch is not None
        )
        self.blocks = nn.ModuleList(ResBlock(c, ch, emb_dim, dropout) for c in in_chs)
        self.attns = nn.ModuleList(
            SpatialAttention(ch, heads, dim_head, context_dim) for _ in in_chs if attn
        )


class UNet(nn.Module):
    """Denoiser of one decoder stage; see the module docstring."""

    channels_last = True

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        fold2 = cfg.fold**2
        in_ch = cfg.in_channels * (2 if cfg.lowres_cond else 1) * fold2
        self.out_channels = cfg.in_channels * (2 if cfg.learned_variance else 1)
        emb_dim = 4 * cfg.dim  # improved-diffusion's time embedding width
        dec = [cfg.dim * m for m in cfg.dim_mults]  # up-path width per level
        efficient = cfg.layout == "efficient"
        enc = [dec[0], *dec[:-1]] if efficient else dec  # down-path width per level
        ctx = cfg.cond_dim if cfg.num_image_tokens > 0 or cfg.text_token_dim else None

        # conditioning
        self.time_embed = TimestepEmbedding(cfg.dim, emb_dim)
        self.image_to_emb = nn.Linear(cfg.image_embed_dim, emb_dim)
        self.null_emb = nn.Parameter(torch.zeros(emb_dim))
        self.aug_embed = TimestepEmbedding(cfg.dim, emb_dim) if cfg.lowres_cond else None
        if cfg.num_image_tokens > 0:
            self.image_to_tokens = nn.Linear(cfg.image_embed_dim, cfg.num_image_tokens * ctx)
            self.context_norm = nn.LayerNorm(ctx)
            self.null_tokens = nn.Parameter(torch.randn(cfg.num_image_tokens, ctx) * 0.02)
        if cfg.text_token_dim:
            self.text_to_context = nn.Sequential(
                nn.LayerNorm(cfg.text_token_dim), nn.Linear(cfg.text_token_dim, cfg.cond_dim)
            )
            self.null_text = nn.Parameter(torch.randn(1, cfg.cond_dim) * 0.02)

        def level(i: int, in_chs: list[int], ch: int, merge_ch: int | None = None) -> Level:
            attn = i in cfg.attn_levels
            heads, dim_head = cfg.heads, cfg.dim_head
            return Level(in_chs, ch, emb_dim, cfg.dropout, attn, heads, dim_head, ctx, merge_ch)

        n = cfg.num_res_blocks
        levels = range(len(dec))
        self.init_conv = nn.Conv2d(in_ch, enc[0], 3, padding=1)
        self.downs = nn.ModuleList(level(i, [enc[i]] * n, enc[i]) for i in levels)
        self.downsamples = nn.ModuleList(
            Downsample(a, b) for a, b in itertools.pairwise(enc)
        )  # (B, enc_i, h, w) -> (B, enc_{i+1}, h / 2, w / 2)
        # "efficient": the last down level is one width behind the middle; a 1x1 widens it
        self.widen = nn.Conv2d(enc[-1], dec[-1], 1) if enc[-1] != dec[-1] else nn.Identity()
        self.mid1 = ResBlock(dec[-1], dec[-1], emb_dim, cfg.dropout)
        self.mid_attn = SpatialAttention(dec[-1], cfg.heads, cfg.dim_head, ctx)
        self.mid2 = ResBlock(dec[-1], dec[-1], emb_dim, cfg.dropout)

        def up(i: int) -> Level:
            if efficient:
                return level(i, [dec[i]] * n, dec[i], merge_ch=dec[i] + enc[i])
            return level(i, [dec[i] + enc[i]] * n, dec[i])

        self.ups = nn.ModuleList(up(i) for i in reversed(levels))
        self.upsamples = nn.ModuleList(
            Upsample(b, a) for a, b in reversed(list(itertools.pairwise(dec)))
        )
        self.out_norm = group_norm(dec[0])
        self.out_conv = nn.Conv2d(dec[0], self.out_channels * fold2, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)  # the net starts as the zero function: stable
        nn.init.zeros_(self.out_conv.bias)
        if self.channels_last:  # kernels in the activations' layout: DDP's grad buckets match
            self.to(memory_format=torch.channels_last)

    def _conditioning(
        self,
        t: Tensor,
        image_embed: Tensor,
        aug_level: Tensor | None,
        drop: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Activated embedding for the resblocks (B, emb) and image tokens (B, S, cond)."""
        cond = self.image_to_emb(image_embed)  # (B, emb)
        if drop is not None:
            cond = torch.where(drop[:, None], self.null_emb.to(cond.dtype), cond)
        emb = self.time_embed(t) + cond  # (B, emb)
        if self.aug_embed is not None:
            if aug_level is None:
                aug_level = torch.zeros_like(t, dtype=torch.float32)
            emb = emb + self.aug_embed(aug_level * 1000)  # same frequency range as t
        context = None
        if self.cfg.num_image_tokens > 0:
            context = self.context_norm(
                rearrange(
                    self.image_to_tokens(image_embed),
                    "b (n d) -> b n d",
                    n=self.cfg.num_image_tokens,
                )
            )  # (B, S, cond)
            if drop is not None:
                context = torch.where(
                    drop[:, None, None], self.null_tokens.to(context.dtype), context
                )
        return F.silu(emb), context

    def _with_text(
        self,
        context: Tensor | None,
        text_tokens: Tensor | None,
        text_mask: Tensor | None,
        drop: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Image tokens + null text token + caption tokens (B, S, cond), and which of them
        attention may read (B, S): a dropped caption leaves the null token alone."""
        b = drop.shape[0]
        null = self.null_text.expand(b, -1, -1)  # (B, 1, cond)
        parts = [null] if context is None else [context, null.to(context.dtype)]
        keep = [torch.ones(b, sum(p.shape[1] for p in parts), dtype=torch.bool, device=drop.device)]
        if text_tokens is not None:
            parts.append(self.text_to_context(text_tokens).to(parts[0].dtype))  # (B, L, cond)
            real = torch.ones_like(text_tokens[..., 0], dtype=torch.bool)
            real = real if text_mask is None else text_mask.bool()
            keep.append(real & ~drop[:, None])
        return torch.cat(parts, dim=1), torch.cat(keep, dim=1)

    def _check_lowres(self, x: Tensor, lowres: Tensor | None) -> None:
        if self.cfg.lowres_cond and lowres is None:
            raise ValueError(
                "this UNet is an upsampler (lowres_cond=True): pass the previous stage's "
                "image as `lowres`"
            )
        if not self.cfg.lowres_cond and lowres is not None:
            raise ValueError("this UNet takes no `lowres` image (lowres_cond=False); drop it")
        if lowres is not None and lowres.shape != x.shape:
            raise ValueError(
                f"`lowres` has shape {tuple(lowres.shape)} but must match x {tuple(x.shape)}: "
                "resize it to x's size first"
            )

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        image_embed: Tensor,
        lowres: Tensor | None = None,
        lowres_aug_level: Tensor | None = None,
        drop_cond: Tensor | None = None,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        drop_text: Tensor | None = None,
        drop_embed: Tensor | None = None,
    ) -> Tensor:
        """Predict from a noised image (B, C, H, W) -> (B, C or 2C, H, W).

        Args:
            x: noised image.
            t: (B,) timesteps, long or float.
            image_embed: (B, image_embed_dim) CLIP image embedding.
            lowres: previous stage's image at x's size; required iff cfg.lowres_cond.
            lowres_aug_level: (B,) noise-augmentation level in [0, 1] (zeros if None).
            drop_cond: (B,) bool; True swaps the image conditioning (and the caption) for
                learned nulls.
            text_tokens: (B, L, text_token_dim) CLIP per-token caption encodings; None = no
                caption (only for a unet built with text_token_dim).
            text_mask: (B, L) bool, True for real tokens.
            drop_text: (B,) bool; True hides the caption alone.
            drop_embed: (B,) bool; True hides the image embedding alone (the caption stays).
        """
        self._check_lowres(x, lowres)
        if lowres is not None:
            x = torch.cat([x, lowres.to(x.dtype)], dim=1)  # (B, 2C, H, W)
        fold = self.cfg.fold
        if fold > 1:
            x = F.pixel_unshuffle(x, fold)  # (B, C * f * f, H / f, W / f)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        drop_image = drop_cond
        if drop_embed is not None:
            drop_image = drop_embed if drop_cond is None else drop_cond | drop_embed
        emb, context = self._conditioning(t, image_embed, lowres_aug_level, drop_image)
        context_mask = None
        if self.cfg.text_token_dim:
            drop = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            for dropped in (drop_cond, drop_text):
                if dropped is not None:
                    drop = drop | dropped
            context, context_mask = self._with_text(context, text_tokens, text_mask, drop)
        elif text_tokens is not None:
            raise ValueError("this UNet reads no text (unet.text_token_dim is unset)")

        h = self.init_conv(x)  # (B, enc_0, h, w)
        skips = []
        for i, down in enumerate(self.downs):
            for j, block in enumerate(down.blocks):
                h = block(h, emb)
                if down.attns:
                    h = down.attns[j](h, context, context_mask)
                skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)  # (B, enc_{i+1}, h / 2, w / 2)
        h = self.mid1(self.widen(h), emb)  # (B, dec_last, h, w)
        h = self.mid_attn(h, context, context_mask)
        h = self.mid2(h, emb)
        for i, up in enumerate(self.ups):
            for j, block in enumerate(up.blocks):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, dec_i + enc_i, h, w)
                if up.merges:
                    h = up.merges[j](h)  # (B, dec_i, h, w)
                h = block(h, emb)  # (B, dec_i, h, w)
                if up.attns:
                    h = up.attns[j](h, context, context_mask)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)  # (B, dec_{i-1}, 2h, 2w)
        out = self.out_conv(F.silu(self.out_norm(h)))  # (B, C_out * f * f, h, w)
        return F.pixel_shuffle(out, fold) if fold > 1 else out  # (B, C_out, H, W)

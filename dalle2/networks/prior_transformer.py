"""The prior's denoiser: a causal transformer read out at a final learned query token.

Sequence (DALL-E 2, section 2.2): [text tokens, text embedding, time, noised image
embedding, query]. Text tokens appear only when given and only as many as given: they are
never padded up to max_text_len, so the common case is a 4-token sequence. With
`text_tokens_as="context"` the text tokens leave the sequence and become keys and values
that every layer's attention reads (cross-attention), which the four tokens attend to.

Classifier-free guidance: a dropped sample's text embedding token is swapped for a learned
null token, and its text tokens are masked out of every attention row (each token still
sees itself, so no row is empty and no NaN appears). Its output then depends on neither.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dalle2.config import PriorNetConfig
from dalle2.networks.layers import Attention, FeedForward, TimestepEmbedding

NUM_SPECIAL = 4  # text embedding, time, x_t, query


class Block(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, cfg: PriorNetConfig, context: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(
            cfg.dim,
            cfg.heads,
            cfg.dim_head,
            context_dim=cfg.dim if context else None,  # text tokens as keys and values
            dropout=cfg.dropout,
        )
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ff = FeedForward(cfg.dim, cfg.ff_mult, swiglu=True, dropout=cfg.dropout)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        last_only: bool = False,
        context: Tensor | None = None,
    ) -> Tensor:
        """(B, T, dim) -> (B, T, dim), or (B, 1, dim) for the last token when `last_only`.

        `mask` is a bool (B, 1, T, S + T) attention mask over [context, sequence] keys (S = 0
        without `context`, (B, S, dim)); None means plain causal.
        """
        h = self.norm1(x)
        if last_only:  # the readout needs one row: skip the others' queries and MLPs
            rows = None if mask is None else mask[:, :, -1:]  # (B, 1, 1, S + T)
            x = x[:, -1:] + self.attn(h, context, attn_mask=rows, last_only=True)
        else:
            x = x + self.attn(h, context, attn_mask=mask, is_causal=mask is None)
        return x + self.ff(self.norm2(x))


class PriorTransformer(nn.Module):
    """Predicts a clean (or eps / v) image embedding; see the module docstring."""

    def __init__(self, cfg: PriorNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.text_embed_in = nn.Linear(cfg.embed_dim, d)
        self.x_in = nn.Linear(cfg.embed_dim, d)
        self.time_embed = TimestepEmbedding(d, d)
        self.null_text_embed = nn.Parameter(torch.randn(d) * 0.02)
        self.query = nn.Parameter(torch.randn(d) * 0.02)
        self.text_tokens_in = (
            nn.Linear(cfg.text_token_dim, d) if cfg.text_token_dim is not None else None
        )
        max_tokens = cfg.max_text_len if cfg.text_token_dim is not None else 0
        # text tokens use rows [0, N); the four special tokens always use the last four rows
        self.pos = nn.Parameter(torch.randn(max_tokens + NUM_SPECIAL, d) * 0.02)
        as_context = cfg.text_tokens_as == "context" and cfg.text_token_dim is not None
        self.context_norm = nn.LayerNorm(d) if as_context else None
        self.blocks = nn.ModuleList(Block(cfg, as_context) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d)
        self.to_out = nn.Linear(d, cfg.embed_dim)

    def _text_tokens(
        self,
        text_tokens: Tensor,
        text_mask: Tensor | None,
        drop_text: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Project the tokens and build the (B, N) key mask: real and not dropped."""
        if self.text_tokens_in is None:
            raise ValueError(
                "text_tokens were given but the prior was built with text_token_dim=None; "
                "set net.text_token_dim or stop passing text tokens"
            )
        b, n, _ = text_tokens.shape
        if n > self.cfg.max_text_len:
            raise ValueError(
                f"{n} text tokens exceed max_text_len={self.cfg.max_text_len}; truncate them"
            )
        tokens = self.text_tokens_in(text_tokens).float() + self.pos[:n]  # (B, N, d)
        keep = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
        if text_mask is not None:
            keep = keep & text_mask.bool()
        if drop_text is not None:
            keep = keep & ~drop_text[:, None]
        return tokens, keep

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        text_embed: Tensor,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        drop_text: Tensor | None = None,
    ) -> Tensor:
        """Predict from a noised image embedding (B, E) -> (B, E).

        Args:
            x_t: noised image embedding.
            t: (B,) timesteps.
            text_embed: (B, E) CLIP text embedding.
            text_tokens: (B, N, text_token_dim) per-token text encodings, N <= max_text_len.
            text_mask: (B, N) bool, True = real token.
            drop_text: (B,) bool; True swaps text embedding and tokens for learned nulls.
        """
        b = x_t.shape[0]
        text = self.text_embed_in(text_embed)  # (B, d)
        if drop_text is not None:
            text = torch.where(drop_text[:, None], self.null_text_embed.to(text.dtype), text)
        special = torch.stack(
            [
                text.float(),
                self.time_embed(t).float(),
                self.x_in(x_t).float(),
                self.query.expand(b, -1),
            ],
            dim=1,
        )  # (B, 4, d); the residual stream stays fp32 under autocast
        seq = special + self.pos[-NUM_SPECIAL:]  # (B, 4, d)
        mask = context = None
        if text_tokens is not None:
            tokens, keep = self._text_tokens(text_tokens, text_mask, drop_text)
            # one mask over [text tokens, special tokens]: causal, dropped/padded keys out
            length = tokens.shape[1] + NUM_SPECIAL
            keys = torch.cat([keep, keep.new_ones(b, NUM_SPECIAL)], dim=1)  # (B, T)
            causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
            eye = torch.eye(length, dtype=torch.bool, device=seq.device)
            mask = ((causal & keys[:, None, :]) | eye)[:, None]  # (B, 1, T, T)
            if self.context_norm is not None:  # tokens are keys only: the special rows
                context = self.context_norm(tokens)  # (B, N, d)
                mask = mask[:, :, -NUM_SPECIAL:]  # (B, 1, 4, N + 4)
            else:
                seq = torch.cat([tokens, seq], dim=1)  # (B, T, d), T = N + 4

        for i, block in enumerate(self.blocks):
            seq = block(seq, mask, last_only=i == len(self.blocks) - 1, context=context)
        return self.to_out(self.norm_out(seq[:, -1]))  # (B, E)

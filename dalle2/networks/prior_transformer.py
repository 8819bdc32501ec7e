"""The prior's denoiser: a causal transformer over conditioning tokens and the noised
image embedding, read out at a final learned query token.

Sequence: [text tokens (only those given; never padded up to max_text_len), text
embedding, time, noised image embedding, query]. Dropped samples (classifier-free
guidance) see a learned null text embedding and none of their text tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dalle2.config import PriorNetConfig
from dalle2.networks.layers import Attention, TimeMLP


class Block(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, dim * ff_mult),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim * ff_mult, dim),
        )

    def forward(self, x: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        x = x + self.attn(self.norm1(x), mask=mask, causal=causal)
        return x + self.ff(self.norm2(x))


class PriorTransformer(nn.Module):
    """Predicts the clean (or eps/v) image embedding; see the module docstring."""

    def __init__(self, cfg: PriorNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.text_in = nn.Linear(cfg.embed_dim, d)
        self.x_in = nn.Linear(cfg.embed_dim, d)
        self.time = TimeMLP(d, d)
        self.null_text = nn.Parameter(torch.randn(cfg.embed_dim) * 0.02)
        self.query = nn.Parameter(torch.randn(d) * 0.02)
        self.tokens_in = nn.Linear(cfg.text_token_dim, d) if cfg.text_token_dim else None
        self.pos = nn.Parameter(torch.randn(cfg.max_text_len + 4, d) * 0.02)
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, cfg.dim_head, cfg.ff_mult, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.embed_dim)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        text_embed: Tensor,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        drop_text: Tensor | None = None,
    ) -> Tensor:
        """(B, E) noised embedding -> (B, E) prediction."""
        b = x_t.shape[0]
        if drop_text is not None:
            text_embed = torch.where(
                drop_text[:, None], self.null_text.to(text_embed.dtype), text_embed
            )
        text = self.text_in(text_embed)
        dt = text.dtype  # bf16 under autocast: keep every token in it
        core = torch.stack(
            [text, self.time(t).to(dt), self.x_in(x_t).to(dt), self.query.to(dt).expand(b, -1)],
            dim=1,
        )  # (B, 4, d)
        mask = None
        use_tokens = text_tokens is not None and self.tokens_in is not None
        if use_tokens:
            n = text_tokens.shape[1]
            tokens = self.tokens_in(text_tokens.to(self.tokens_in.weight.dtype))  # (B, N, d)
            seq = torch.cat([tokens.to(core.dtype), core], dim=1)  # (B, N+4, d)
            valid = torch.ones(b, n + 4, dtype=torch.bool, device=x_t.device)
            if text_mask is not None:
                valid[:, :n] = text_mask.bool()
            if drop_text is not None:
                valid[:, :n] &= ~drop_text[:, None]
            length = n + 4
            causal = torch.ones(length, length, dtype=torch.bool, device=x_t.device).tril()
            mask = (causal[None] & valid[:, None, :])[:, None]  # (B, 1, L, L)
            # a padded query row would see nothing: let every row see itself
            mask = mask | torch.eye(length, dtype=torch.bool, device=x_t.device)[None, None]
        else:
            seq = core
        seq = seq + self.pos[: seq.shape[1]].to(seq.dtype)
        for block in self.blocks:
            seq = block(seq, mask, causal=mask is None)
        return self.out(self.norm(seq[:, -1]))  # (B, E)

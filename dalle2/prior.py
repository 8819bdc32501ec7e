"""The diffusion prior: a CLIP text embedding in, a CLIP image embedding out.

loss = prior.loss(text_embed, image_embed)       # training
image_embed = prior.sample(text_embed)           # generation
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle2.config import PriorConfig, SampleConfig
from dalle2.diffusion import GaussianDiffusion, Generators, guided_sample
from dalle2.diffusion import best_of as keep_best
from dalle2.networks import PriorTransformer


def scale_embed(embed: Tensor) -> Tensor:
    """l2-normalise and scale by sqrt(dim) so entries are ~unit variance for diffusion."""
    return F.normalize(embed.float(), dim=-1) * math.sqrt(embed.shape[-1])


class DiffusionPrior(nn.Module):
    """Prior transformer + its Gaussian process + embedding scaling."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = PriorTransformer(cfg.net)
        self.process = GaussianDiffusion.from_config(cfg.diffusion)

    def _model(
        self,
        text_embed: Tensor,
        text_tokens: Tensor | None,
        text_mask: Tensor | None,
        drop: Tensor | None,
    ):
        tokens = text_tokens if self.cfg.use_text_tokens else None
        mask = text_mask if self.cfg.use_text_tokens else None

        def model(x: Tensor, t: Tensor) -> Tensor:
            return self.net(x, t, text_embed, tokens, mask, drop_text=drop)

        return model

    def loss(
        self,
        text_embed: Tensor,
        image_embed: Tensor,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """Diffusion loss on scaled image embeddings, dropping the text with cond_drop_prob."""
        b = image_embed.shape[0]
        drop = torch.rand(b, device=image_embed.device) < self.cfg.cond_drop_prob
        model = self._model(scale_embed(text_embed), text_tokens, text_mask, drop)
        return self.process.training_loss(model, scale_embed(image_embed))

    forward = loss  # calling the module computes the loss, so DDP's hooks see it

    @torch.no_grad()
    def sample(
        self,
        text_embed: Tensor,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        *,
        cfg: SampleConfig | None = None,
        best_of: int | None = None,
        generator: Generators = None,
        progress: bool = False,
    ) -> Tensor:
        """(B, E) unit-norm image embeddings; of `best_of` candidates per caption, the one
        with the highest cosine similarity to its text embedding is kept."""
        cfg = cfg or self.cfg.sample
        n = best_of or self.cfg.best_of
        b, e = text_embed.shape
        text = scale_embed(text_embed).repeat_interleave(n, dim=0)
        tokens = None if text_tokens is None else text_tokens.repeat_interleave(n, dim=0)
        mask = None if text_mask is None else text_mask.repeat_interleave(n, dim=0)
        keep = torch.zeros(b * n, dtype=torch.bool, device=text.device)
        x = guided_sample(
            self._model(text, tokens, mask, keep),
            self._model(text, tokens, mask, ~keep),
            self.process,
            (b * n, e),
            cfg,
            device=text.device,
            clamp="none",
            generator=generator,
            progress=progress,
        )
        x = F.normalize(x.float(), dim=-1)
        return x if n == 1 else keep_best(x, x, text_embed)[0]

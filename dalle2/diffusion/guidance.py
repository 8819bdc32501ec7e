"""How every model samples: classifier-free guidance (Ho & Salimans 2022) around a sampler,
and best-of-n reranking by cosine to the caption. The prior and each decoder stage call
these, so guided sampling and reranking have one home."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dalle2.config import SampleConfig
from dalle2.diffusion.process import GaussianDiffusion, ModelFn
from dalle2.diffusion.samplers import Clamp, Generators, Inpaint, randn, sample


def classifier_free_guidance(
    cond: ModelFn, uncond: ModelFn, scale: float, *, learned_variance: bool = False
) -> ModelFn:
    """A denoiser returning u + scale * (c - u) of the conditional and unconditional outputs.

    Args:
        cond: the network with its conditioning.
        uncond: the same network with the conditioning dropped.
        scale: guidance scale; 1 is the conditional model, 0 the unconditional one.
        learned_variance: outputs carry a variance half on dim 1; only the prediction half is
            guided and the conditional variance is kept, since extrapolated variances are
            not variances of anything.
    """
    if scale == 1:
        return cond

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        c, u = cond(x_t, t), uncond(x_t, t)
        if not learned_variance:
            return u + scale * (c - u)
        c_pred, c_var = c.chunk(2, dim=1)
        u_pred = u.chunk(2, dim=1)[0]
        return torch.cat([u_pred + scale * (c_pred - u_pred), c_var], dim=1)

    return guided


def guided_sample(
    cond: ModelFn,
    uncond: ModelFn,
    process: GaussianDiffusion,
    shape: tuple[int, ...],
    cfg: SampleConfig,
    *,
    device: torch.device,
    clamp: Clamp | None = None,
    learned_variance: bool = False,
    generator: Generators = None,
    progress: bool = False,
    inpaint: Inpaint | None = None,
) -> Tensor:
    """Draw `shape` from fresh noise with `cfg`'s sampler, steps and guidance scale (the
    unconditional model runs only when guidance is not 1). `clamp` overrides cfg.clamp:
    embeddings are never clamped. `inpaint` keeps part of a known image (RePaint)."""
    model = classifier_free_guidance(
        cond, uncond, cfg.guidance_scale, learned_variance=learned_variance
    )
    return sample(
        model,
        process,
        randn(shape, generator, device),
        sampler=cfg.sampler,
        steps=cfg.steps,
        eta=cfg.eta,
        clamp=cfg.clamp if clamp is None else clamp,
        generator=generator,
        progress=progress,
        inpaint=inpaint,
    )


def best_of(candidates: Tensor, embeds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Of each caption's n candidates, the one whose embedding is closest to the caption's.

    `candidates` (B * n, ...) hold a caption's n rows together, `embeds` (B * n, E) their
    CLIP embeddings and `target` (B, E) the captions'. Returns the kept (B, ...) rows and
    their index (B,) among each caption's n."""
    b = target.shape[0]
    found = F.normalize(embeds.float(), dim=-1).view(b, -1, embeds.shape[-1])
    sim = (found * F.normalize(target.float(), dim=-1)[:, None]).sum(-1)  # (B, n)
    pick = sim.argmax(dim=1)
    rows = torch.arange(b, device=pick.device)
    return candidates.view(b, -1, *candidates.shape[1:])[rows, pick], pick

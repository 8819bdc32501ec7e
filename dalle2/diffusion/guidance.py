"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper that returns a new denoiser."""

from __future__ import annotations

import torch

from dalle2.diffusion.process import ModelFn


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

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c, u = cond(x_t, t), uncond(x_t, t)
        if not learned_variance:
            return u + scale * (c - u)
        c_pred, c_var = c.chunk(2, dim=1)
        u_pred = u.chunk(2, dim=1)[0]
        return torch.cat([u_pred + scale * (c_pred - u_pred), c_var], dim=1)

    return guided

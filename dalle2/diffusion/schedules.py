"""Noise schedules: the betas that define the forward process q(x_t | x_{t-1}).

Betas are float64 because alphas_cumprod of a 1000-step schedule loses digits in float32,
and the samplers divide by sqrt(alphas_cumprod) near t = T.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

MAX_BETA = 0.999  # a beta of 1 would erase x_0 entirely and make x_0 = f(x_t) undefined


def make_betas(kind: Literal["cosine", "linear"], num_steps: int) -> torch.Tensor:
    """Betas of a `num_steps` schedule, float64 of shape (T,).

    Args:
        kind: "cosine" (Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020).
        num_steps: number of diffusion steps T.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if kind == "cosine":
        return _cosine_betas(num_steps)
    if kind == "linear":
        return _linear_betas(num_steps)
    raise ValueError(f"unknown noise schedule {kind!r}; use 'cosine' or 'linear'")


def _cosine_betas(num_steps: int, s: float = 0.008) -> torch.Tensor:
    """alphas_cumprod(t) = f(t) / f(0) with f(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=MAX_BETA)


def _linear_betas(num_steps: int) -> torch.Tensor:
    """DDPM's 1e-4..0.02 over 1000 steps, rescaled so that fewer steps destroy as much signal."""
    scale = 1000 / num_steps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    # below ~20 steps the rescaled end exceeds 1; clipping keeps the process defined
    return betas.clamp(max=MAX_BETA)

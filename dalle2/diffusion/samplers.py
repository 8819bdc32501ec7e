"""Samplers: pure functions from noise to x_0 over one process and one network.

Every sampler walks the process's indices from T - 1 down to 0 (respace the process first to
sample with fewer steps) and reports each step's x_0 estimate through `callback(i, x0)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dalle2.diffusion.process import GaussianDiffusion, ModelFn

Clamp = Literal["none", "static", "dynamic"]
Sampler = Literal["ddpm", "ddim", "dpmpp_2m"]
Callback = Callable[[int, torch.Tensor], None]
# One generator for the batch, or one per row: then a row's noise is the same whatever else
# is in the batch (a served prompt and seed give one image, alone or among 31 others).
Generators = torch.Generator | Sequence[torch.Generator] | None

DYNAMIC_PERCENTILE = 0.995  # Saharia et al. 2022


def clamp_x0(x0: torch.Tensor, clamp: Clamp) -> torch.Tensor:
    """Keep an x_0 estimate in the data range [-1, 1].

    "dynamic" divides by the per-sample 99.5th percentile of |x_0| (when above 1) instead of
    clipping, so saturated pixels keep their detail at high guidance scales.
    """
    if clamp == "none":
        return x0
    if clamp == "static":
        return x0.clamp(-1, 1)
    if clamp == "dynamic":
        s = torch.quantile(x0.detach().flatten(1).abs().float(), DYNAMIC_PERCENTILE, dim=1)
        s = s.clamp(min=1).to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
        return x0.clamp(-s, s) / s
    raise ValueError(f"unknown clamp {clamp!r}; use 'none', 'static' or 'dynamic'")


def _denoise(
    model: ModelFn, process: GaussianDiffusion, x: torch.Tensor, i: int, clamp: Clamp
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x_0, eps, variance values or None) of the network at index i, x_0 clamped."""
    t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
    pred, var_values = process.split_output(process.call_model(model, x, t).to(x.dtype))
    x0, eps = process.predict_x0_eps(pred, x, t)
    if clamp != "none":
        x0 = clamp_x0(x0, clamp)
        a = float(process.alphas_cumprod[i])
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)  # the eps consistent with x_0
    return x0, eps, var_values


def _indices(process: GaussianDiffusion, progress: bool, desc: str) -> Iterable[int]:
    """T - 1, ..., 0 behind a progress bar that stays off unless asked for."""
    steps = range(process.num_steps - 1, -1, -1)
    return tqdm(steps, total=process.num_steps, disable=not progress, desc=desc, leave=False)


def randn(
    shape: Sequence[int],
    generator: Generators,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise; every draw of sampling goes through here. With one generator
    per row, the rows split `shape[0]` evenly (a prior's candidates stay with their
    caption) and each draws its share from its own generator."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    rows, left = divmod(shape[0], len(generator))
    if left:
        raise ValueError(f"{shape[0]} rows of noise do not split over {len(generator)} rows")
    share = (rows, *shape[1:])
    draws = [torch.randn(share, generator=g, device=device, dtype=dtype) for g in generator]
    return torch.cat(draws)


def _randn(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return randn(x.shape, generator, x.device, x.dtype)


@torch.no_grad()
def sample_ddpm(
    model: ModelFn,
    process: GaussianDiffusion,
    noise: torch.Tensor,
    *,
    clamp: Clamp = "none",
    generator: Generators = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Algorithm 2 of Ho et al. 2020: x_{t-1} ~ p(x_{t-1} | x_t), learned or posterior variance."""
    x = noise
    for i in _indices(process, progress, "ddpm"):
        x0, _, var_values = _denoise(model, process, x, i, clamp)
        if callback is not None:
            callback(i, x0)
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        mean, log_var = process.q_posterior(x0, x, t)
        if var_values is not None:
            log_var = process.model_log_variance(var_values, t)
        x = mean
        if i > 0:  # no noise on the last step: x_0 is the posterior mean itself
            x = x + torch.exp(0.5 * log_var) * _randn(x, generator)
    return x


@torch.no_grad()
def sample_ddim(
    model: ModelFn,
    process: GaussianDiffusion,
    noise: torch.Tensor,
    *,
    eta: float = 0.0,
    clamp: Clamp = "none",
    generator: Generators = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Song et al. 2021: deterministic at eta = 0; eta = 1 has DDPM's posterior variance."""
    x = noise
    for i in _indices(process, progress, "ddim"):
        x0, eps, _ = _denoise(model, process, x, i, clamp)
        if callback is not None:
            callback(i, x0)
        a, a_prev = float(process.alphas_cumprod[i]), float(process.alphas_cumprod_prev[i])
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if i > 0 and eta > 0:
            x = x + sigma * _randn(x, generator)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: ModelFn,
    process: GaussianDiffusion,
    noise: torch.Tensor,
    *,
    clamp: Clamp = "none",
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) of Lu et al. 2022: second-order multistep in lambda = log(alpha/sigma)."""
    alpha = process.sqrt_alphas_cumprod.tolist()
    sigma = process.sqrt_one_minus_alphas_cumprod.tolist()
    lam = (0.5 * process.snr.log()).tolist()  # log(alpha / sigma)
    x, x0_prev, h_prev = noise, None, 0.0
    for i in _indices(process, progress, "dpm++2m"):
        x0, _, _ = _denoise(model, process, x, i, clamp)
        if callback is not None:
            callback(i, x0)
        if i == 0:  # the next noise level is zero: the solution is the data prediction
            x = x0
            break
        h = lam[i - 1] - lam[i]
        d = x0
        if x0_prev is not None:  # extrapolate the data prediction linearly in lambda
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigma[i - 1] / sigma[i]) * x - alpha[i - 1] * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


@dataclass(frozen=True)
class Inpaint:
    """What an edit keeps: `known` (B, 3, S, S) in [-1, 1] and `keep` (B, 1, S, S), 1 where
    the known pixels stay and 0 where the model draws; `resample` times each step is taken
    (RePaint's r)."""

    known: torch.Tensor
    keep: torch.Tensor
    resample: int = 4

    def at(self, size: int) -> Inpaint:
        """At another resolution: a pixel is kept only where all it covers is kept, so the
        region drawn never shrinks below the mask."""
        if self.known.shape[-1] == size:
            return self
        known = F.interpolate(self.known.float(), size=size, mode="bilinear", antialias=True)
        keep = F.interpolate(self.keep.float(), size=size, mode="area") > 1 - 1e-4
        return Inpaint(known, keep.to(self.keep.dtype), self.resample)


@torch.no_grad()
def sample_repaint(
    model: ModelFn,
    process: GaussianDiffusion,
    noise: torch.Tensor,
    inpaint: Inpaint,
    *,
    clamp: Clamp = "none",
    generator: Generators = None,
    progress: bool = False,
) -> torch.Tensor:
    """Inpainting on DDIM steps (RePaint, Lugmayr et al. 2022): after each step the kept pixels
    are the known image noised to the step's level and the rest is the model's; each step is
    taken `resample` times, noised back up one step in between, so the drawn region settles
    against what is kept. The last step leaves the known pixels exactly as given."""
    known, keep = inpaint.known.to(noise.dtype), inpaint.keep.to(noise.dtype)
    x = noise
    for i in _indices(process, progress, "repaint"):
        a, a_prev = float(process.alphas_cumprod[i]), float(process.alphas_cumprod_prev[i])
        for r in range(inpaint.resample):
            x0, eps, _ = _denoise(model, process, x, i, clamp)
            drawn = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
            kept = known
            if i > 0:
                kept = math.sqrt(a_prev) * known + math.sqrt(1 - a_prev) * _randn(known, generator)
            x_prev = keep * kept + (1 - keep) * drawn
            if i > 0 and r + 1 < inpaint.resample:  # back up: x_i ~ q(x_i | x_{i-1})
                up = a / a_prev
                x = math.sqrt(up) * x_prev + math.sqrt(1 - up) * _randn(x_prev, generator)
        x = x_prev
    return x


def sample(
    model: ModelFn,
    process: GaussianDiffusion,
    noise: torch.Tensor,
    *,
    sampler: Sampler = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    clamp: Clamp = "none",
    generator: Generators = None,
    progress: bool = False,
    callback: Callback | None = None,
    inpaint: Inpaint | None = None,
) -> torch.Tensor:
    """Respace `process` to `steps` (None keeps all) and run the named sampler from `noise`;
    with `inpaint`, RePaint on the same steps whatever the sampler."""
    if sampler not in ("ddpm", "ddim", "dpmpp_2m"):
        raise ValueError(f"unknown sampler {sampler!r}; use 'ddpm', 'ddim' or 'dpmpp_2m'")
    if steps is not None:
        process = process.respace(steps)
    if inpaint is not None:
        return sample_repaint(
            model, process, noise, inpaint, clamp=clamp, generator=generator, progress=progress
        )
    common = {"clamp": clamp, "progress": progress, "callback": callback}
    if sampler == "ddpm":
        return sample_ddpm(model, process, noise, generator=generator, **common)
    if sampler == "ddim":
        return sample_ddim(model, process, noise, eta=eta, generator=generator, **common)
    return sample_dpmpp_2m(model, process, noise, **common)

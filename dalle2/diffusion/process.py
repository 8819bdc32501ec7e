"""The Gaussian diffusion process: forward noising, posteriors and the training loss.

A plain object that is handed the network (improved-diffusion style): networks never see
betas, only `model(x_t, t)` with the training timestep `t`. Coefficients live here as float64
tensors on the CPU and are gathered per sample, then cast to the input's dtype and device, so
one process serves (B, D) embeddings and (B, C, H, W) images alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

import torch

from dalle2.diffusion.schedules import make_betas

if TYPE_CHECKING:
    from dalle2.config import DiffusionConfig

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t_model) -> output

VLB_WEIGHT = 0.001  # lambda of the hybrid loss (Nichol & Dhariwal 2021)


class Prediction(str, Enum):
    """What the network outputs."""

    EPS = "eps"  # the noise
    X0 = "x0"  # the clean sample
    V = "v"  # sqrt(a) * eps - sqrt(1 - a) * x0 (Salimans & Ho 2022)


class LossWeighting(str, Enum):
    """How the per-timestep MSE is weighted."""

    NONE = "none"
    MIN_SNR = "min_snr"  # Hang et al. 2023
    P2 = "p2"  # Choi et al. 2022, k = 1, gamma = 1


def _gather(buf: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """buf[t] as `like`'s dtype and device, shaped (B, 1, ...) to broadcast over `like`."""
    vals = buf[t.to(buf.device)].to(device=like.device, dtype=like.dtype)
    return vals.view(-1, *[1] * (like.dim() - 1))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the batch."""
    return x.flatten(1).mean(dim=1)


def _normal_kl(
    m1: torch.Tensor, l1: torch.Tensor, m2: torch.Tensor, l2: torch.Tensor
) -> torch.Tensor:
    """KL(N(m1, e^l1) || N(m2, e^l2)), elementwise, in nats."""
    return 0.5 * (-1.0 + l2 - l1 + torch.exp(l1 - l2) + (m1 - m2) ** 2 * torch.exp(-l2))


def _normal_nll(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, e^log_var), elementwise, in nats."""
    return 0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


class GaussianDiffusion:
    """The forward process q(x_t | x_0) of a beta schedule and its reverse-step helpers.

    Args:
        betas: float64 schedule of shape (T,), see `make_betas`.
        prediction: what the network outputs (eps, x0 or v).
        loss_weighting: per-timestep weight of the MSE.
        min_snr_gamma: clamp of the SNR for min_snr weighting.
        learned_variance: the network outputs 2C channels, the second half interpolating the
            reverse log-variance (improved-diffusion).
        timestep_map: the training timestep the network is told at each index; set by
            `respace`, identity otherwise.
        lognormal: (mean, std) of ln(sigma) for the training timesteps (EDM's noise levels);
            None draws them uniformly.
    """

    def __init__(
        self,
        betas: torch.Tensor,
        prediction: Prediction | str = Prediction.EPS,
        loss_weighting: LossWeighting | str = LossWeighting.NONE,
        min_snr_gamma: float = 5.0,
        learned_variance: bool = False,
        timestep_map: torch.Tensor | None = None,
        lognormal: tuple[float, float] | None = None,
    ) -> None:
        self.prediction = Prediction(prediction)
        self.loss_weighting = LossWeighting(loss_weighting)
        self.min_snr_gamma = float(min_snr_gamma)
        self.learned_variance = learned_variance
        self.lognormal = lognormal

        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.dim() != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D tensor with every value in (0, 1)")
        T = betas.shape[0]
        if timestep_map is None:
            timestep_map = torch.arange(T)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long).cpu()
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have shape ({T},)")

        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        self.log_sigma = -0.5 * self.snr.log()  # ascending in t

        # q(x_{t-1} | x_t, x_0); its variance is 0 at t = 0, so the log uses t = 1's value
        a, a_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1 - a_prev) / (1 - a)
        first = self.posterior_variance[1:2] if T > 1 else betas[:1]
        self.posterior_log_variance = torch.cat([first, self.posterior_variance[1:]]).log()
        self.posterior_mean_coef_x0 = betas * a_prev.sqrt() / (1 - a)
        self.posterior_mean_coef_xt = (1 - a_prev) * (1 - betas).sqrt() / (1 - a)
        self.log_betas = betas.log()
        self.loss_weights = self._loss_weights()

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> GaussianDiffusion:
        """Build the process described by a `DiffusionConfig`."""
        return cls(
            make_betas(cfg.schedule, cfg.num_steps),
            prediction=cfg.prediction,
            loss_weighting=cfg.loss_weighting,
            min_snr_gamma=cfg.min_snr_gamma,
            learned_variance=cfg.learned_variance,
            lognormal=(
                (cfg.lognormal_mean, cfg.lognormal_std) if cfg.noise_levels == "lognormal" else None
            ),
        )

    @property
    def num_steps(self) -> int:
        """Number of steps T of this (possibly respaced) process."""
        return self.betas.shape[0]

    def respace(self, num_steps: int) -> GaussianDiffusion:
        """A process over `num_steps` evenly spaced steps of this one, first and last kept.

        New betas are derived from the kept alphas_cumprod, so x_t at a kept step has the same
        marginal as before and a network trained on this process samples with fewer steps.
        """
        T = self.num_steps
        if not 1 <= num_steps <= T:
            raise ValueError(f"can respace {T} steps to between 1 and {T}, not {num_steps}")
        if num_steps == 1:
            keep = torch.tensor([T - 1])
        else:
            keep = torch.linspace(0, T - 1, num_steps, dtype=torch.float64).round().long()
        a = self.alphas_cumprod[keep]
        a_prev = torch.cat([a.new_ones(1), a[:-1]])
        return GaussianDiffusion(
            1 - a / a_prev,
            prediction=self.prediction,
            loss_weighting=self.loss_weighting,
            min_snr_gamma=self.min_snr_gamma,
            learned_variance=self.learned_variance,
            timestep_map=self.timestep_map[keep],
            lognormal=self.lognormal,
        )

    # ------------------------------------------------------------------------- forward

    def sample_t(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training timestep indices in [0, T), shape (batch,): uniform, or the step whose
        sigma is nearest above a log-normal draw."""
        if self.lognormal is None:
            return torch.randint(0, self.num_steps, (batch,), device=device, generator=generator)
        mean, std = self.lognormal
        z = torch.randn(batch, device=device, generator=generator, dtype=torch.float64)
        levels = self.log_sigma.to(device)
        return torch.searchsorted(levels, mean + std * z).clamp(max=self.num_steps - 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample from q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I)."""
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(x_{t-1} | x_t, x_0); the log-variance is (B, 1, ...)."""
        mean = (
            _gather(self.posterior_mean_coef_x0, t, x_t) * x0
            + _gather(self.posterior_mean_coef_xt, t, x_t) * x_t
        )
        return mean, _gather(self.posterior_log_variance, t, x_t)

    # ------------------------------------------------------------------------- network

    def call_model(self, model: ModelFn, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Run the network at indices `t`, telling it the training timesteps they stand for."""
        return model(x_t, self.timestep_map.to(x_t.device)[t.to(x_t.device)])

    def split_output(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, variance values in [-1, 1] or None) from the network's raw output."""
        if not self.learned_variance:
            return out, None
        if out.dim() < 2 or out.shape[1] % 2:
            raise ValueError("a learned-variance network must output 2*C channels on dim 1")
        pred, var_values = out.chunk(2, dim=1)
        return pred, var_values

    def predict_x0_eps(
        self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) implied by the network's prediction at x_t."""
        sa = _gather(self.sqrt_alphas_cumprod, t, pred)
        s1a = _gather(self.sqrt_one_minus_alphas_cumprod, t, pred)
        if self.prediction is Prediction.EPS:
            return (x_t - s1a * pred) / sa, pred
        if self.prediction is Prediction.X0:
            return pred, (x_t - sa * pred) / s1a
        return sa * x_t - s1a * pred, s1a * x_t + sa * pred

    def model_log_variance(self, var_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log sigma_t^2 between log(posterior variance) (v = -1) and log(beta_t) (v = 1).

        The true reverse variance lies between those bounds, so v is clamped to [-1, 1]; this
        also keeps the KL of the hybrid loss finite for any network output.
        """
        frac = (var_values.clamp(-1, 1) + 1) / 2
        low = _gather(self.posterior_log_variance, t, var_values)
        high = _gather(self.log_betas, t, var_values)
        return frac * high + (1 - frac) * low

    # ------------------------------------------------------------------------- loss

    def _loss_weights(self) -> torch.Tensor:
        """Per-timestep weight of the MSE of this process's prediction target, shape (T,).

        Weightings are defined on the x_0 error; the eps error is snr times it and the v error
        (snr + 1) times it, so the weight is divided by that factor for the target in use.
        """
        snr = self.snr
        if self.loss_weighting is LossWeighting.NONE:
            return torch.ones_like(snr)
        if self.loss_weighting is LossWeighting.MIN_SNR:
            w_x0 = snr.clamp(max=self.min_snr_gamma)
        else:  # P2 with k = 1, gamma = 1: 1 / (1 + snr) on the eps error
            w_x0 = snr / (1 + snr)
        factor = {Prediction.EPS: snr, Prediction.X0: torch.ones_like(snr), Prediction.V: snr + 1}
        return w_x0 / factor[self.prediction]

    def training_loss(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Weighted MSE on the prediction target (+ the VLB term if the variance is learned).

        Args:
            model: the network, called as `model(x_t, timestep_map[t])`.
            x0: clean samples (B, ...).
            t: timestep indices (B,); uniform if None.
            noise: the eps of q_sample; standard normal if None.
            generator: drives the t and noise draws left to this method.

        Returns:
            A float32 scalar, whatever the dtype of the network's output.
        """
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        pred, var_values = self.split_output(self.call_model(model, x_t, t).float())
        x0, noise, x_t = x0.float(), noise.float(), x_t.float()

        if self.prediction is Prediction.EPS:
            target = noise
        elif self.prediction is Prediction.X0:
            target = x0
        else:
            sa = _gather(self.sqrt_alphas_cumprod, t, x0)
            target = sa * noise - _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        loss = _mean_flat((pred - target) ** 2) * _gather(self.loss_weights, t, pred).flatten()
        if var_values is not None:
            loss = loss + VLB_WEIGHT * self.num_steps * self._vlb_term(pred, var_values, x0, x_t, t)
        return loss.mean()

    def _vlb_term(
        self,
        pred: torch.Tensor,
        var_values: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """L_t of the variational bound in bits per dim, (B,); trains only the variance.

        The mean is detached so that the MSE alone shapes it (hybrid loss); L_vlb = sum_t L_t
        is estimated as T * L_t by the caller.
        """
        model_x0, _ = self.predict_x0_eps(pred.detach(), x_t, t)
        model_mean, _ = self.q_posterior(model_x0, x_t, t)
        model_log_var = self.model_log_variance(var_values, t)
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        kl = _mean_flat(_normal_kl(true_mean, true_log_var, model_mean, model_log_var))
        nll = _mean_flat(_normal_nll(x0, model_mean, model_log_var))
        return torch.where(t.to(kl.device) == 0, nll, kl) / math.log(2.0)

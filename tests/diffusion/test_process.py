"""The Gaussian process: forward marginals, conversions, respacing and the training loss."""

from __future__ import annotations

import pytest
import torch

from dalle2.config import DiffusionConfig
from dalle2.diffusion import GaussianDiffusion, LossWeighting, Prediction, make_betas

T = 20
SHAPES = [(4, 8), (2, 3, 4, 4)]  # (B, D) embeddings and (B, C, H, W) images


def _process(**kwargs: object) -> GaussianDiffusion:
    return GaussianDiffusion(make_betas("cosine", T), **kwargs)  # type: ignore[arg-type]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _target(
    p: GaussianDiffusion, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What a perfect network predicts for (x0, eps) at t."""
    shape = (-1, *[1] * (x0.dim() - 1))
    sa = p.sqrt_alphas_cumprod[t].view(shape).to(x0)
    s1a = p.sqrt_one_minus_alphas_cumprod[t].view(shape).to(x0)
    return {Prediction.EPS: eps, Prediction.X0: x0, Prediction.V: sa * eps - s1a * x0}[p.prediction]


# ----------------------------------------------------------------------------- forward


def test_q_sample_moments() -> None:
    p = _process()
    x0 = torch.full((20_000, 2), 0.7, dtype=torch.float64)
    t = torch.full((20_000,), 12)
    x_t = p.q_sample(x0, t, torch.randn(x0.shape, generator=_gen(), dtype=x0.dtype))
    a = p.alphas_cumprod[12].item()
    assert x_t.mean().item() == pytest.approx(a**0.5 * 0.7, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - a, abs=0.02)


def test_q_posterior_composes_to_marginal() -> None:
    """x_t ~ q(x_t | x_0), then x_{t-1} ~ q(x_{t-1} | x_t, x_0), has law q(x_{t-1} | x_0)."""
    p, n, t = _process(), 40_000, 8
    x0 = torch.full((n, 1), -0.4, dtype=torch.float64)
    tt = torch.full((n,), t)
    g = _gen()
    x_t = p.q_sample(x0, tt, torch.randn(x0.shape, generator=g, dtype=x0.dtype))
    mean, log_var = p.q_posterior(x0, x_t, tt)
    x_prev = mean + (0.5 * log_var).exp() * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    a_prev = p.alphas_cumprod[t - 1].item()
    assert x_prev.mean().item() == pytest.approx(a_prev**0.5 * -0.4, abs=0.01)
    assert x_prev.var().item() == pytest.approx(1 - a_prev, abs=0.01)


def test_q_posterior_at_zero_is_x0() -> None:
    p = _process()
    x0, x_t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    mean, _ = p.q_posterior(x0, x_t, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(mean, x0)


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("shape", SHAPES)
def test_prediction_round_trip(prediction: Prediction, shape: tuple[int, ...]) -> None:
    p = _process(prediction=prediction)
    g = _gen()
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, T, (shape[0],), generator=g)
    x_t = p.q_sample(x0, t, eps)
    x0_hat, eps_hat = p.predict_x0_eps(_target(p, x0, eps, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_bad_modes_raise() -> None:
    with pytest.raises(ValueError):
        _process(prediction="sample")
    with pytest.raises(ValueError):
        _process(loss_weighting="snr")


# ----------------------------------------------------------------------------- respacing


def test_respace_keeps_marginals_and_maps_timesteps() -> None:
    p = GaussianDiffusion(make_betas("cosine", 10))
    r = p.respace(4)
    assert r.num_steps == 4
    assert r.timestep_map.tolist() == [0, 3, 6, 9]
    torch.testing.assert_close(r.alphas_cumprod, p.alphas_cumprod[[0, 3, 6, 9]])
    rr = r.respace(2)  # composed: indices 0 and 3 of the respaced process
    assert rr.timestep_map.tolist() == [0, 9]
    torch.testing.assert_close(rr.alphas_cumprod, p.alphas_cumprod[[0, 9]])
    assert p.respace(1).timestep_map.tolist() == [9]


def test_respace_to_same_steps_is_identity() -> None:
    p = _process(prediction="v", learned_variance=True)
    r = p.respace(T)
    assert r is not p
    assert r.timestep_map.tolist() == list(range(T))
    torch.testing.assert_close(r.betas, p.betas)
    torch.testing.assert_close(r.alphas_cumprod, p.alphas_cumprod)
    assert (r.prediction, r.learned_variance) == (p.prediction, p.learned_variance)


def test_respace_out_of_range_raises() -> None:
    with pytest.raises(ValueError, match="between 1 and"):
        _process().respace(T + 1)
    with pytest.raises(ValueError, match="between 1 and"):
        _process().respace(0)


def test_model_is_told_training_timesteps() -> None:
    seen: list[torch.Tensor] = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return torch.zeros_like(x)

    r = GaussianDiffusion(make_betas("linear", 10)).respace(4)
    r.training_loss(model, torch.randn(3, 2), t=torch.tensor([0, 2, 3]))
    assert seen[0].dtype == torch.long
    assert seen[0].tolist() == [0, 6, 9]


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("weighting", list(LossWeighting))
def test_oracle_loss_is_zero(prediction: Prediction, weighting: LossWeighting) -> None:
    p = _process(prediction=prediction, loss_weighting=weighting)
    g = _gen()
    x0, noise = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.randint(0, T, (6,), generator=g)
    loss = p.training_loss(lambda x, tm: _target(p, x0, noise, t), x0, t=t, noise=noise)
    assert loss.shape == ()
    assert loss.item() < 1e-10


@pytest.mark.parametrize("prediction", list(Prediction))
def test_weightings_differ_and_match_formula(prediction: Prediction) -> None:
    g = _gen()
    x0 = torch.randn(8, 6, generator=g)
    noise, t = torch.randn(8, 6, generator=g), torch.arange(0, T, T // 8)[:8]
    losses = {}
    for weighting in LossWeighting:
        p = _process(prediction=prediction, loss_weighting=weighting, min_snr_gamma=5.0)
        losses[weighting] = p.training_loss(
            lambda x, tm: 0.3 * x, x0, t=t, noise=noise, generator=g
        ).item()
    assert losses[LossWeighting.MIN_SNR] != pytest.approx(losses[LossWeighting.NONE])
    assert losses[LossWeighting.P2] != pytest.approx(losses[LossWeighting.NONE])

    snr = _process().snr
    divide = {Prediction.EPS: snr, Prediction.X0: 1.0, Prediction.V: snr + 1}[prediction]
    min_snr = _process(prediction=prediction, loss_weighting="min_snr").loss_weights
    p2 = _process(prediction=prediction, loss_weighting="p2").loss_weights
    torch.testing.assert_close(min_snr, snr.clamp(max=5.0) / divide)
    torch.testing.assert_close(p2, snr / (1 + snr) / divide)


def test_loss_is_float32_for_bf16_model() -> None:
    p = _process()
    x0 = torch.randn(4, 8)
    loss = p.training_loss(lambda x, t: (0.5 * x).bfloat16(), x0, generator=_gen())
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("scale", [1.0, 1e4, -1e4])
def test_learned_variance_loss_finite(prediction: Prediction, scale: float) -> None:
    p = _process(prediction=prediction, learned_variance=True)
    g = _gen()
    x0 = torch.randn(5, 2, 4, 4, generator=g)
    out = (scale * torch.randn(5, 4, 4, 4, generator=g)).requires_grad_()
    t = torch.tensor([0, 1, 7, T - 2, T - 1])  # t = 0 takes the NLL branch
    loss = p.training_loss(lambda x, tm: out, x0, t=t, generator=g)
    loss.backward()
    assert torch.isfinite(loss)
    assert out.grad is not None and torch.isfinite(out.grad).all()
    if scale == 1.0:  # inside [-1, 1] the variance half is trained
        assert out.grad[:, 2:].abs().sum() > 0


def test_learned_variance_vlb_trains_only_variance() -> None:
    """The VLB term is stopped at the mean, so the mean half sees only the MSE gradient."""
    g = _gen()
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([1, 5, 9, 13])
    out = torch.randn(4, 4, 3, 3, generator=g)
    grads = []
    for learned in (False, True):
        p = _process(learned_variance=learned)
        o = (out if learned else out[:, :2]).clone().requires_grad_()
        p.training_loss(lambda x, tm, o=o: o, x0, t=t, noise=noise).backward()
        grads.append(o.grad[:, :2])
    torch.testing.assert_close(grads[0], grads[1])


def test_split_output() -> None:
    p = _process(learned_variance=True)
    pred, var = p.split_output(torch.randn(2, 6, 4, 4))
    assert pred.shape == var.shape == (2, 3, 4, 4)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="2\\*C channels"):
        p.split_output(torch.randn(2, 5, 4, 4))
    assert _process().split_output(torch.ones(2, 3))[1] is None


def test_from_config() -> None:
    cfg = DiffusionConfig(
        schedule="linear",
        num_steps=50,
        prediction="v",
        loss_weighting="min_snr",
        min_snr_gamma=3.0,
        learned_variance=True,
    )
    p = GaussianDiffusion.from_config(cfg)
    assert p.num_steps == 50
    assert p.prediction is Prediction.V
    assert p.loss_weighting is LossWeighting.MIN_SNR
    assert p.min_snr_gamma == 3.0
    assert p.learned_variance
    torch.testing.assert_close(p.betas, make_betas("linear", 50))
    assert GaussianDiffusion.from_config(DiffusionConfig()).num_steps == 1000


def test_sample_t_range() -> None:
    t = _process().sample_t(1000, torch.device("cpu"), _gen())
    assert t.dtype == torch.long
    assert t.min().item() == 0 and t.max().item() == T - 1


def test_lognormal_noise_levels_follow_the_asked_distribution() -> None:
    """EDM's levels: ln(sigma) of the drawn steps centres on the mean, about 68% within one
    std, and the same generator seed draws the same steps."""
    p = GaussianDiffusion.from_config(
        DiffusionConfig(noise_levels="lognormal", lognormal_mean=-1.2, lognormal_std=1.2)
    )
    t = p.sample_t(20_000, torch.device("cpu"), _gen())
    log_sigma = p.log_sigma[t]
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < p.num_steps
    assert abs(log_sigma.median().item() + 1.2) < 0.05
    within = ((log_sigma + 1.2).abs() < 1.2).double().mean().item()
    assert 0.64 < within < 0.72
    assert torch.equal(t, p.sample_t(20_000, torch.device("cpu"), _gen()))
    default = GaussianDiffusion.from_config(DiffusionConfig())
    uniform = default.sample_t(20_000, torch.device("cpu"), _gen())
    assert abs(uniform.double().mean().item() - 499.5) < 10  # the default is unchanged

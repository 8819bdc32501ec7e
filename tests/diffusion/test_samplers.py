"""Samplers and guidance: pinned numbers, equivalences and known distributions."""

from __future__ import annotations

import pytest
import torch

from dalle2.diffusion import (
    GaussianDiffusion,
    clamp_x0,
    classifier_free_guidance,
    make_betas,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
)
from dalle2.diffusion.samplers import Clamp, Sampler

SAMPLERS = ["ddpm", "ddim", "dpmpp_2m"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dummy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, input-dependent stand-in for a network."""
    return 0.1 * x + 0.01 * t.float().view(-1, *[1] * (x.dim() - 1))


def _noise(shape: tuple[int, ...] = (2, 3, 4, 4)) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(0), dtype=torch.float64)


# ----------------------------------------------------------------------------- pinned


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [
        ("ddpm", -1506.4818942305915),
        ("ddim", -1674.0723572462375),
        ("dpmpp_2m", -1634.4283761970082),
    ],
)
def test_pinned_sums(sampler: Sampler, expected: float) -> None:
    process = GaussianDiffusion(make_betas("cosine", 10))
    out = sample(dummy, process, _noise(), sampler=sampler, generator=_gen(1))
    assert out.shape == (2, 3, 4, 4)
    assert out.sum().item() == pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("clamp", ["none", "static", "dynamic"])
@pytest.mark.parametrize("steps", [None, 7])
def test_ddim_eta_one_is_ddpm(clamp: Clamp, steps: int | None) -> None:
    process = GaussianDiffusion(make_betas("cosine", 20))
    if steps is not None:
        process = process.respace(steps)
    ddpm = sample_ddpm(dummy, process, _noise(), clamp=clamp, generator=_gen(1))
    ddim = sample_ddim(dummy, process, _noise(), eta=1.0, clamp=clamp, generator=_gen(1))
    torch.testing.assert_close(ddim, ddpm)


def test_ddim_eta_zero_is_deterministic() -> None:
    process = GaussianDiffusion(make_betas("cosine", 10))
    a = sample_ddim(dummy, process, _noise(), generator=_gen(1))
    b = sample_ddim(dummy, process, _noise(), generator=_gen(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_learned_variance_at_lower_bound_is_posterior_variance() -> None:
    """v = -1 selects the posterior variance, the fixed choice of the plain process."""
    betas = make_betas("cosine", 10)
    fixed = GaussianDiffusion(betas)
    learned = GaussianDiffusion(betas, learned_variance=True)

    def with_var(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([dummy(x, t), -torch.ones_like(x)], dim=1)

    a = sample_ddpm(dummy, fixed, _noise(), generator=_gen(1))
    b = sample_ddpm(with_var, learned, _noise(), generator=_gen(1))
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- known data


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("clamp", ["none", "static"])
def test_point_mass_is_recovered(sampler: Sampler, clamp: Clamp) -> None:
    """Data that is one point x*: the ideal denoiser predicts x* and every sampler lands there."""
    process = GaussianDiffusion(make_betas("cosine", 100), prediction="x0")
    target = torch.tensor([[0.5, -0.25, 0.9]])
    steps: list[int] = []

    def on_step(i: int, x0: torch.Tensor) -> None:
        steps.append(i)
        torch.testing.assert_close(x0, target.expand_as(x0))

    out = sample(
        lambda x, t: target.expand_as(x),
        process,
        torch.randn(4, 3, generator=_gen(0)),
        sampler=sampler,
        steps=10,
        eta=0.5,
        clamp=clamp,
        generator=_gen(1),
        callback=on_step,
    )
    torch.testing.assert_close(out, target.expand_as(out), atol=1e-3, rtol=0)
    assert steps == list(range(9, -1, -1))


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 200), ("ddim", 100), ("dpmpp_2m", 50)])
def test_gaussian_data_is_recovered(sampler: Sampler, steps: int) -> None:
    """With the exact denoiser of N(mu, s^2) data, samples have that mean and spread."""
    mu, s = 0.5, 0.3
    process = GaussianDiffusion(make_betas("cosine", 1000), prediction="x0")
    a_all = process.alphas_cumprod.float()

    def posterior_mean(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = a_all[t].view(-1, 1)
        return mu + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x - a.sqrt() * mu)

    noise = torch.randn(4000, 1, generator=_gen(0))
    out = sample(posterior_mean, process, noise, sampler=sampler, steps=steps, generator=_gen(1))
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(s, abs=0.02)


# ----------------------------------------------------------------------------- options


def test_unknown_options_raise() -> None:
    process = GaussianDiffusion(make_betas("cosine", 10))
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sample(dummy, process, _noise(), sampler="euler")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown clamp 'hard'"):
        sample(dummy, process, _noise(), clamp="hard")  # type: ignore[arg-type]


def test_clamp_x0() -> None:
    inside = torch.rand(2, 3, 8, 8) * 1.8 - 0.9
    clamps: list[Clamp] = ["none", "static", "dynamic"]
    for clamp in clamps:
        torch.testing.assert_close(clamp_x0(inside, clamp), inside)
    wide = torch.linspace(-4, 4, 2 * 1000).view(2, 1000)
    assert clamp_x0(wide, "static").abs().max() == 1
    dynamic = clamp_x0(wide, "dynamic")
    assert dynamic.abs().max() == pytest.approx(1.0)
    s = torch.quantile(wide.abs(), 0.995, dim=1, keepdim=True)
    torch.testing.assert_close(dynamic[:, 500], wide[:, 500] / s[:, 0])  # rescaled, not clipped


def test_progress_bar_float32_run() -> None:
    process = GaussianDiffusion(make_betas("linear", 5), prediction="v")
    out = sample_dpmpp_2m(dummy, process, torch.randn(2, 4), progress=True)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- guidance


def test_guidance_scales() -> None:
    calls = {"uncond": 0}

    def cond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x + 1

    def uncond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls["uncond"] += 1
        return x - 1

    x, t = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    assert classifier_free_guidance(cond, uncond, 1.0) is cond
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0)(x, t), uncond(x, t))
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 3.0)(x, t), x + 5)
    assert calls["uncond"] == 3  # none from scale 1


def test_guidance_keeps_conditional_variance() -> None:
    x, t = torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
    c = torch.randn(2, 6, 4, 4)
    u = torch.randn(2, 6, 4, 4)
    guided = classifier_free_guidance(lambda *_: c, lambda *_: u, 2.0, learned_variance=True)(x, t)
    torch.testing.assert_close(guided[:, :3], u[:, :3] + 2.0 * (c[:, :3] - u[:, :3]))
    torch.testing.assert_close(guided[:, 3:], c[:, 3:])


def test_per_row_generators_draw_a_rows_noise_whatever_else_is_in_the_batch() -> None:
    from dalle2.diffusion import randn

    def gens(*seeds: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in seeds]

    cpu = torch.device("cpu")
    both = randn((4, 3), gens(1, 2), cpu)  # two candidates per row, as the prior draws
    assert torch.equal(both[2:], randn((2, 3), gens(2), cpu))
    assert torch.equal(both[:2], randn((2, 3), torch.Generator().manual_seed(1), cpu))
    with pytest.raises(ValueError, match="do not split"):
        randn((3, 3), gens(1, 2), cpu)

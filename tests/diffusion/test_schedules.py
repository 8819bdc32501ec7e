"""Invariants of the noise schedules."""

from __future__ import annotations

import pytest
import torch

from dalle2.diffusion import make_betas


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("num_steps", [2, 10, 1000])
def test_schedule_invariants(kind: str, num_steps: int) -> None:
    betas = make_betas(kind, num_steps)
    assert betas.dtype == torch.float64
    assert betas.shape == (num_steps,)
    assert ((betas > 0) & (betas < 1)).all()
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    if num_steps >= 10:  # enough steps to start near the data and end near pure noise
        assert alphas_cumprod[0] > 0.97
        assert alphas_cumprod[-1] < 1e-3


def test_cosine_matches_closed_form() -> None:
    T, s = 1000, 0.008
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * torch.pi / 2) ** 2
    expected = (f / f[0])[1:-1]  # the last beta is clipped, so its alphas_cumprod differs
    alphas_cumprod = torch.cumprod(1 - make_betas("cosine", T), dim=0)[:-1]
    torch.testing.assert_close(alphas_cumprod, expected)


def test_linear_matches_ddpm_at_1000_steps() -> None:
    betas = make_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)


def test_bad_schedule_raises() -> None:
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        make_betas("quadratic", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        make_betas("cosine", 0)

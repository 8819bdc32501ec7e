"""Gaussian diffusion: schedules, the process and its loss, samplers and guidance."""

from dalle2.diffusion.guidance import best_of, classifier_free_guidance, guided_sample
from dalle2.diffusion.process import GaussianDiffusion, LossWeighting, ModelFn, Prediction
from dalle2.diffusion.samplers import (
    Clamp,
    Generators,
    Inpaint,
    Sampler,
    clamp_x0,
    randn,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
)
from dalle2.diffusion.schedules import make_betas

__all__ = [
    "Clamp",
    "GaussianDiffusion",
    "Generators",
    "Inpaint",
    "LossWeighting",
    "ModelFn",
    "Prediction",
    "Sampler",
    "best_of",
    "clamp_x0",
    "classifier_free_guidance",
    "guided_sample",
    "make_betas",
    "randn",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
]

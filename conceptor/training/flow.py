"""Rectified-flow training math (SD 3/3.5, Flux) as small pure functions, beside training/diffusion.py.

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3): the
noisy latent is a straight line between data and noise, the model predicts the velocity along it, and
training samples the position sigma from a density that favours the middle (logit-normal, "mode") and
shifts it towards noise for large images. Each function names what it matches in diffusers
(``training_utils``, ``FlowMatchEulerDiscreteScheduler``, ``pipeline_flux.calculate_shift``);
tests/test_flow.py checks them against those helpers.
"""
from __future__ import annotations

import math

import torch

from .diffusion import _bcast

SCHEMES = ("uniform", "logit_normal", "mode")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def flow_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps  (Esser et al. 2024, eq. 3 with a_t = 1 - t, b_t = t)."""
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity d x_sigma / d sigma = eps - x0, what SD3 and Flux predict."""
    return noise - x0


def sample_u(scheme: str, n: int, generator: torch.Generator, *, logit_mean: float = 0.0, logit_std: float = 1.0,
             mode_scale: float = 1.29) -> torch.Tensor:
    """n positions in [0, 1]: uniform, logit-normal (sigmoid of a normal; Esser et al. 2024, eq. 19) or
    "mode" (eq. 20); draws as diffusers' ``compute_density_for_timestep_sampling`` does, so one generator
    state gives the same u."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(mean=logit_mean, std=logit_std, size=(n,), generator=generator))
    u = torch.rand(size=(n,), generator=generator)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheme != "uniform":
        raise ValueError(f"timestep sampling {scheme!r}: use one of {', '.join(SCHEMES)}")
    return u


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's fixed shift towards noise, shift * s / (1 + (shift - 1) s) (Esser et al. 2024, eq. 23;
    ``FlowMatchEulerDiscreteScheduler(shift=...)``)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift: mu linear in the number of image tokens (``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """exp(mu) / (exp(mu) + (1 / s - 1)): the exponential shift of a dynamically shifted schedule (Flux)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def loss_weight(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights: none, sigma^-2 ("sigma_sqrt") or cosmap (Esser et al. 2024, section 3.1;
    ``compute_loss_weighting_for_sd3``)."""
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    if scheme != "none":
        raise ValueError(f"loss weighting {scheme!r}: use one of {', '.join(WEIGHTINGS)}")
    return torch.ones_like(sigmas)

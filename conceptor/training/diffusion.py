"""The diffusion training math as small pure functions (k-diffusion style). Tensors in, tensors out."""
from __future__ import annotations

import torch


def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator,
                     device: torch.device | str = "cpu", low: int = 0, high: int | None = None) -> torch.Tensor:
    """Uniform integer timesteps in [low, high) (default [0, T), DDPM training: Ho et al. 2020, Alg. 1). The same
    generator draws make the default window exactly the old uniform draw."""
    high = num_train_timesteps if high is None else high
    return torch.randint(low, high, (n,), generator=generator, device=generator.device).to(device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (Ho et al. 2020, eq. 4)."""
    abar = _bcast(alphas_cumprod.to(x0.device)[t], x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0  (Salimans & Ho 2022, progressive distillation)."""
    abar = _bcast(alphas_cumprod.to(x0.device)[t], x0)
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


def target_for(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (eps) or the velocity (v)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return v_target(x0, noise, t, alphas_cumprod)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t)  (Kingma et al. 2021, VDM)."""
    abar = alphas_cumprod.to(t.device)[t].float()
    return abar / (1 - abar)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weight min(SNR, gamma) / SNR, or / (SNR + 1) for v targets  (Hang et al. 2023)."""
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped / (snr_t + 1) if prediction_type == "v_prediction" else clipped / snr_t


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """eps + strength * per-channel constant, so the model can learn very dark/bright images (Guttenberg 2023)."""
    if strength == 0:
        return noise
    b, c = noise.shape[:2]
    shift = torch.randn((b, c) + (1,) * (noise.ndim - 2), generator=generator, device=generator.device)
    return noise + strength * shift.to(noise.device, noise.dtype)


def mse_per_sample(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of each sample, in fp32 (the simple loss of Ho et al. 2020, eq. 14); with ``weight``
    (per latent pixel, broadcast over channels) the weighted mean, so a mask's loss is per pixel that counts."""
    return weighted_mean((pred.float() - target.float()).pow(2), weight)


def weighted_mean(err: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of ``err`` [B, ...], or its ``weight``-weighted mean (masked loss: weight 1 on the concept,
    ``--mask-weight`` elsewhere). Normalised by the weights' sum, unlike kohya's loss * mask, so a small mask
    does not quietly lower the learning rate."""
    if weight is None:
        return err.flatten(1).mean(1)
    w = weight.to(err.device, torch.float32).expand_as(err)
    return (w * err).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-8)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, optionally weighted, averaged over the batch (in fp32)."""
    per_sample = mse_per_sample(pred, target)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()

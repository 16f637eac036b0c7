"""Flow-matching maths (training/flow.py) against diffusers' own helpers, the oracle its SD3/Flux scripts use."""
from __future__ import annotations

import pytest
import torch

from conceptor.training import flow


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_timestep_sampling_draws_what_diffusers_draws(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = flow.sample_u(scheme, 64, torch.Generator().manual_seed(5), logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    theirs = compute_density_for_timestep_sampling(scheme if scheme != "uniform" else "none", 64, logit_mean=0.3,
                                                   logit_std=1.2, mode_scale=1.29,
                                                   generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours, theirs) and ours.min() >= 0 and ours.max() <= 1
    with pytest.raises(ValueError, match="use one of"):
        flow.sample_u("cosine", 2, torch.Generator())


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_match_diffusers(scheme):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.linspace(0.05, 1.0, 20)
    assert torch.allclose(flow.loss_weight(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas))


def test_sd3_shift_is_the_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    plain = torch.linspace(1, 1000, 1000).flip(0) / 1000  # the unshifted sigmas the scheduler starts from
    assert torch.allclose(flow.shift_sigmas(plain, 3.0), sched.sigmas.to(plain.dtype), atol=1e-6)


def test_flux_shift_is_the_pipelines():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for tokens in (256, 1024, 4096):
        assert flow.flux_mu(tokens) == pytest.approx(calculate_shift(tokens))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sigmas = torch.linspace(1.0, 1 / 28, 28)
    mu = flow.flux_mu(1024)
    sched.set_timesteps(sigmas=sigmas.numpy(), mu=mu)
    assert torch.allclose(flow.time_shift(mu, sigmas), sched.sigmas[:-1].float(), atol=1e-6)


def test_noisy_latent_and_target_are_the_straight_line():
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    noisy = flow.flow_noise(x0, eps, sigma)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[2], eps[2])
    assert torch.allclose(noisy[1], (x0[1] + eps[1]) / 2)
    # The velocity target moves a noisy latent to the data in one Euler step of size sigma.
    assert torch.allclose(noisy - sigma.view(-1, 1, 1, 1) * flow.flow_target(x0, eps), x0, atol=1e-6)

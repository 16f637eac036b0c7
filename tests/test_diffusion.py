import pytest
import torch

from conceptor.training import diffusion as D


@pytest.fixture()
def acp():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return torch.cumprod(1 - betas, 0)


def test_add_noise_matches_diffusers(acp):
    from diffusers import DDPMScheduler

    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(D.add_noise(x0, noise, t, s.alphas_cumprod), s.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(D.v_target(x0, noise, t, s.alphas_cumprod), s.get_velocity(x0, noise, t), atol=1e-6)


def test_targets(acp):
    x0, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    assert D.target_for("epsilon", x0, noise, t, acp) is noise
    v = D.target_for("v_prediction", x0, noise, t, acp)
    # v, x_t and x0 satisfy x0 = sqrt(abar) x_t - sqrt(1-abar) v (Salimans & Ho 2022)
    a = acp[t].view(-1, 1, 1, 1)
    xt = D.add_noise(x0, noise, t, acp)
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5)
    with pytest.raises(ValueError):
        D.target_for("sample", x0, noise, t, acp)


def test_min_snr_weight(acp):
    t = torch.tensor([0, 999])
    s = D.snr(t, acp)
    assert s[0] > 5 > s[1]  # early steps are almost clean, late ones almost pure noise
    w = D.min_snr_weight(s, 5.0, "epsilon")
    assert torch.allclose(w, torch.tensor([5.0 / s[0].item(), 1.0]))
    wv = D.min_snr_weight(s, 5.0, "v_prediction")
    assert torch.allclose(wv, torch.minimum(s, torch.tensor(5.0)) / (s + 1))


def test_offset_noise_is_per_channel_constant():
    g = torch.Generator().manual_seed(0)
    noise = torch.zeros(2, 4, 8, 8)
    out = D.offset_noise(noise, 0.1, g)
    assert torch.allclose(out, out[..., :1, :1].expand_as(out))
    assert out.abs().max() > 0
    assert D.offset_noise(noise, 0.0, g) is noise


def test_timesteps_in_range_and_seeded():
    a = D.sample_timesteps(1000, 1000, torch.Generator().manual_seed(1))
    b = D.sample_timesteps(1000, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 999


def test_weighted_loss():
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert D.diffusion_loss(pred, target).item() == 1.0
    assert D.diffusion_loss(pred, target, torch.tensor([0.0, 2.0])).item() == 1.0

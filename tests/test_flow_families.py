"""SD3 and Flux through the family layer, against diffusers' own code: the prompt encoding of their pipelines
and the loss their example scripts (train_dreambooth_lora_sd3.py / _flux.py) compute for the same latents,
noise, sigmas and prompts. The scripts' lines are restated here with diffusers' helpers, as the oracle."""
from __future__ import annotations

import pytest
import torch

from conceptor.families.flow import FlowSettings, flow_loss, flow_loss_at
from conceptor.families.flux import image_ids, pack, unpack
from conceptor.models.load import load_components
from conceptor.models.text import encode, token_ids
from conceptor.models.tiny import build_tiny_pipeline_folder

PROMPTS = ["a photo of sks toy", "a red thing on the beach"]


@pytest.fixture(scope="module", params=["sd3", "flux", "flux-schnell"])
def tiny(request, tmp_path_factory):
    folder = build_tiny_pipeline_folder(tmp_path_factory.mktemp(request.param) / "m", request.param)
    return request.param, folder, load_components(str(folder))


def _pipeline(family, folder):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    return cls.from_pretrained(folder, local_files_only=True)


def test_family_is_read_from_the_model(tiny):
    family, _, c = tiny
    assert c.family == family.split("-")[0] and c.unet is None and c.denoiser is c.transformer
    assert c.prediction_type == "flow" and c.flow.name == c.family
    assert c.vae.config.latent_channels == 16 and c.vae.config.shift_factor  # SD3/Flux VAEs shift, then scale
    assert c.max_sequence_length == (512 if family == "flux" else 256)  # the pipelines' own T5 lengths
    assert len(c.text_encoders) == (3 if family == "sd3" else 2)


@torch.no_grad()
def test_prompt_encoding_is_the_pipelines(tiny):
    family, folder, c = tiny
    pipe = _pipeline(family, folder)
    ours_hidden, ours_pooled = encode(c, token_ids(c, PROMPTS))
    if family == "sd3":
        hidden, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                                  max_sequence_length=c.max_sequence_length)
    else:
        hidden, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=c.max_sequence_length)
    assert ours_hidden.shape == hidden.shape and ours_pooled.shape == pooled.shape
    assert torch.allclose(ours_hidden, hidden, atol=1e-6) and torch.allclose(ours_pooled, pooled, atol=1e-6)


def test_packing_and_position_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 10)
    packed = pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack(packed, 6, 10), x)
    assert torch.equal(unpack(packed, 6, 10), FluxPipeline._unpack_latents(packed, 48, 80, 8))
    assert torch.equal(image_ids(6, 10, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))


def _script_loss(family, c, x0, noise, sigmas, hidden, pooled, weighting, guidance):
    """The loss lines of diffusers' train_dreambooth_lora_{sd3,flux}.py, with their defaults
    (SD3: --precondition_outputs 1), for already scaled latents x0 and timesteps = sigmas * 1000."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    timesteps = sigmas * 1000
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    if family == "sd3":
        pred = c.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden,
                             pooled_projections=pooled, return_dict=False)[0]
        pred = pred * (-s) + noisy
        target = x0
    else:
        b, ch, h, w = x0.shape
        ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype)
        packed = FluxPipeline._pack_latents(noisy, batch_size=b, num_channels_latents=ch, height=h, width=w)
        g = torch.tensor([guidance]).expand(b) if c.transformer.config.guidance_embeds else None
        pred = c.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=g, pooled_projections=pooled,
                             encoder_hidden_states=hidden, txt_ids=torch.zeros(hidden.shape[1], 3), img_ids=ids,
                             return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, height=h * 8, width=w * 8, vae_scale_factor=8)
        target = noise - x0
    weight = compute_loss_weighting_for_sd3(weighting_scheme=weighting, sigmas=s)
    return torch.mean((weight.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
@torch.no_grad()
def test_loss_equals_diffusers_scripts(tiny, weighting):
    family, _, c = tiny
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 16, 4, 6, generator=g)  # non-square on purpose: packing and ids must follow h and w
    noise = torch.randn(2, 16, 4, 6, generator=g)
    sigmas = torch.tensor([0.25, 0.8])
    hidden, pooled = encode(c, token_ids(c, PROMPTS))
    ours = flow_loss_at(c, c.flow, x0, noise, sigmas, hidden, pooled, weighting, guidance=3.5)
    theirs = _script_loss(family, c, x0, noise, sigmas, hidden, pooled, weighting, 3.5)
    assert ours.shape == (2,) and torch.isfinite(ours).all()
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6), (ours, theirs)


@torch.no_grad()
def test_sampled_loss_is_reproducible_and_shards_like_one_batch(tiny):
    _, _, c = tiny
    x0 = torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    hidden, pooled = encode(c, token_ids(c, PROMPTS * 2))
    s = FlowSettings()
    whole = flow_loss(c, x0, hidden, pooled, s, torch.Generator().manual_seed(9))
    again = flow_loss(c, x0, hidden, pooled, s, torch.Generator().manual_seed(9))
    assert torch.equal(whole, again)
    # two processes, each with its half of the global batch, draw the same noise and sigmas for their rows
    half = flow_loss(c, x0[2:], hidden[2:], pooled[2:], s, torch.Generator().manual_seed(9), rows=([2, 3], 4))
    assert torch.allclose(half, whole[2:], atol=1e-6)


def test_the_family_shift_moves_sigmas_towards_noise(tiny):
    family, _, c = tiny
    u = torch.linspace(0.05, 0.95, 10)
    shifted = c.flow.shift(c, u, 1024, 1024, None)
    assert (shifted >= u - 1e-6).all() and (shifted[1:] > shifted[:-1]).all()
    assert torch.allclose(c.flow.shift(c, u, 64, 64, 1.0), u)  # --flow-shift 1: no shift
    big, small = c.flow.shift(c, u, 1024, 1024, None), c.flow.shift(c, u, 256, 256, None)
    if family == "flux":  # dev's shift depends on the image size: a larger image gets noisier sigmas
        assert (big > small).all() and (small > u).all()
    elif family == "flux-schnell":  # schnell's scheduler has no shift (shift 1, no dynamic shifting)
        assert torch.equal(big, u) and torch.equal(small, u)
    else:  # SD3: its scheduler's fixed shift 3, whatever the size
        assert torch.allclose(big, small) and torch.allclose(big, 3 * u / (1 + 2 * u))

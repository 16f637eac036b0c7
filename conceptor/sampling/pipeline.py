"""Sampling: a diffusers pipeline over our Components, named schedulers, fixed per-image seeds."""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image

from ..errors import ConceptorError
from ..models.load import Components

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


def make_scheduler(components: Components, name: str = "ddim"):
    """A sampler configured from the model's own scheduler config (betas, prediction type, offsets)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ConceptorError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    config = dict(components.scheduler_config)
    # Latents are not bounded to [-1, 1]; clipping them wrecks samples (SD's configs set this False too).
    config["clip_sample"] = False
    return cls.from_config(config)


def build_pipeline(components: Components, scheduler: str = "ddim"):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if components.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
            scheduler=make_scheduler(components, scheduler))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=make_scheduler(components, scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(components: Components, prompts: list[str], seeds: list[int], *, negative_prompt: str | None = None,
           steps: int = 25, guidance: float | None = None, scheduler: str = "ddim", width: int | None = None,
           height: int | None = None, batch_size: int = 4,
           progress: Callable[[int], None] | None = None) -> list[Image.Image]:
    """One image per (prompt, seed) pair, in order; image i depends only on its own prompt and seed.

    ``guidance`` None is the model's own default (``Components.default_guidance``: 7.5 unless the model
    folder says otherwise). Multi-vector tokens need no rewriting here: diffusers' pipeline expands ``tok``
    to ``tok tok_1 ...`` from the tokenizer's vocabulary (TextualInversionLoaderMixin.maybe_convert_prompt).
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    guidance = components.default_guidance if guidance is None else guidance
    width = width or components.default_resolution
    height = height or components.default_resolution
    if width % 8 or height % 8:
        raise ConceptorError(f"--width/--height must be multiples of 8, got {width}x{height}")
    if scheduler == "pndm" and steps < 4:
        raise ConceptorError("the pndm sampler needs --steps 4 or more (its multistep warm-up takes 4)")
    pipe = build_pipeline(components, scheduler)
    device = components.unet.device
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch_size]]
        # Initial noise is drawn on the CPU so a seed gives the same picture on any device.
        shape = (1, components.unet.config.in_channels, height // components.vae_scale_factor,
                 width // components.vae_scale_factor)
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device, components.unet.dtype)
        out = pipe(chunk, negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                   num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                   latents=latents, generator=generators, output_type="latent")
        images.extend(decode(components, pipe, out.images))
        if progress:
            progress(len(chunk))
    return images


@torch.no_grad()
def decode(components: Components, pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> PIL images. A half-precision VAE that overflows (SDXL's in fp16) would give black images
    silently; here it is noticed, the VAE is switched to fp32 with a warning, and the batch decoded again."""
    import logging

    vae = components.vae
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    x = latents / vae.config.scaling_factor + shift
    image = vae.decode(x.to(vae.dtype)).sample
    if not torch.isfinite(image).all():
        if vae.dtype == torch.float32:
            raise ConceptorError("the VAE decoded NaN/inf even in fp32: the sampled latents diverged; try fewer "
                                 "--guidance or another --scheduler")
        logging.getLogger("conceptor").warning(
            "the VAE overflowed in %s while decoding; running it in fp32 from now on (or pass an fp16-fixed VAE)",
            str(vae.dtype).replace("torch.", ""))
        vae.to(torch.float32)
        image = vae.decode(x.float()).sample
    return pipe.image_processor.postprocess(image.float(), output_type="pil")

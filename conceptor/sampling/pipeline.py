"""Sampling: a diffusers pipeline over our Components, named schedulers, fixed per-image seeds."""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from PIL import Image

from ..errors import ConceptorError
from ..models.load import Components
from ..models.pipeline import SCHEDULERS, build_pipeline, make_scheduler  # noqa: F401 (sampling's names)
from ..models.text import warn_if_cut
from ..models.vae import switched_to_fp32

# torch generators take seeds up to 2**64 - 1 and image i uses seed + i: 2**63 - 1 leaves room for any count.
MAX_SEED = 2**63 - 1


def check_sampling(*, steps: int, guidance: float | None, width: int | None, height: int | None, batch_size: int,
                   scheduler: str = "ddim", num_images: int = 1, seed: int | None = 0) -> None:
    """Generation settings that need no model, each wrong one one line: the CLI checks them before the model
    loads, Model.generate and sample() for Python callers. ``width``/``height``/``guidance`` None = the model's."""
    for name, size in (("width", width), ("height", height)):
        if size is not None and (size <= 0 or size % 8):
            raise ConceptorError(f"--width/--height must be positive multiples of 8 (e.g. 512), got --{name} {size}")
    checks = [
        (num_images >= 1, f"--num-images must be at least 1, got {num_images}"),
        (batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
        (steps >= 1, f"--steps must be at least 1, got {steps}"),
        (scheduler != "pndm" or steps >= 4, "the pndm sampler needs --steps 4 or more (its multistep warm-up takes 4)"),
        (guidance is None or math.isfinite(guidance), f"--guidance must be a finite number, got {guidance}"),
        (seed is None or (isinstance(seed, numbers.Integral) and 0 <= seed <= MAX_SEED),  # numpy ints too
         f"--seed must be a whole number between 0 and {MAX_SEED}, got {seed}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConceptorError(message)


def free_memory(device: torch.device) -> int | None:
    """Bytes still free on ``device``; None where that cannot be asked (MPS, XLA...)."""
    if device.type == "cuda":  # what the driver has left plus what torch holds cached but unused
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available
    return None


def check_vae_memory(vae, batch: int, height: int, width: int, what: str, part: str) -> None:
    """Refuse an image size whose VAE pass cannot fit, before anything that size is allocated.

    A lower bound, so it never refuses what would fit: the full-resolution layers of the KL autoencoder
    (Rombach et al. 2022; encoder's first and decoder's last block) hold ``block_out_channels[0]`` channels
    (128 in SD's VAE) per pixel of each image in the batch, at the VAE's dtype; the real peak is several times it.
    """
    need = batch * vae.config.block_out_channels[0] * height * width * vae.dtype.itemsize
    free = free_memory(vae.device)
    if free is not None and need > free:
        where = "this machine" if vae.device.type == "cpu" else str(vae.device)
        raise ConceptorError(f"{what} needs at least {need / 1e9:.1f} GB for the {part} alone; {where} has "
                             f"{free / 1e9:.1f} GB free")


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
    check_sampling(steps=steps, guidance=guidance, width=width, height=height, batch_size=batch_size,
                   scheduler=scheduler)
    guidance = components.default_guidance if guidance is None else guidance
    width = width or components.default_resolution
    height = height or components.default_resolution
    check_vae_memory(components.vae, min(batch_size, len(prompts)), height, width,
                     f"--width {width} --height {height}", "VAE decoder")
    warn_if_cut(components, list(dict.fromkeys([*prompts, negative_prompt or ""])))
    pipe = build_pipeline(components, scheduler)
    c, flow = components, components.flow
    device, dtype = c.denoiser.device, c.denoiser.dtype
    extra = {} if flow is None else {"max_sequence_length": c.max_sequence_length}
    if flow is not None and negative_prompt and not flow.supports_negative(c):
        raise ConceptorError(f"{flow.title} with a guidance embedding (dev) takes no negative prompt: its guidance "
                             "is distilled, there is no unconditional pass; leave --negative-prompt out")
    if flow is not None:
        extra.update(flow.cfg_kwargs(c, guidance))
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch_size]]
        # Initial noise is drawn on the CPU so a seed gives the same picture on any device.
        shape = (1, c.vae.config.latent_channels, height // c.vae_scale_factor, width // c.vae_scale_factor)
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators])
        if flow is not None:
            latents = flow.prepare_latents(c, latents)
        if flow is None:
            text = {"prompt": chunk, "negative_prompt": [negative_prompt] * len(chunk) if negative_prompt else None}
        else:
            text = _flow_text(c, chunk, negative_prompt or "", guidance, device, dtype)
        out = pipe(**text, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                   latents=latents.to(device, dtype), generator=generators, output_type="latent", **extra)
        out_latents = out.images if flow is None else flow.latents_out(c, out.images, height, width)
        images.extend(decode(components, pipe, out_latents))
        if progress:
            progress(len(chunk))
    return images


def _flow_text(c: Components, prompts: list[str], negative: str, guidance: float, device, dtype) -> dict:
    """SD3/Flux prompt embeddings computed here, by the family layer, and handed to the pipeline: its own
    encode_prompt would run T5 on the transformer's device, and a run keeps T5 in CPU memory."""
    from ..models.text import encode, token_ids

    def embed(texts):
        hidden, pooled = encode(c, token_ids(c, texts))
        return hidden.to(device, dtype), pooled.to(device, dtype)

    hidden, pooled = embed(prompts)
    out = {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}
    if c.flow.supports_negative(c) and guidance > 1:  # classifier-free guidance: the pipeline's "" by default
        neg_hidden, neg_pooled = embed([negative] * len(prompts))
        out.update(negative_prompt_embeds=neg_hidden, negative_pooled_prompt_embeds=neg_pooled)
    return out


@torch.no_grad()
def decode(components: Components, pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> PIL images. A half-precision VAE that overflows (SDXL's in fp16) would give black images
    silently; here it is noticed, the VAE is switched to fp32 with a warning, and the batch decoded again."""
    vae = components.vae
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    x = latents / vae.config.scaling_factor + shift
    image = vae.decode(x.to(vae.dtype)).sample
    if switched_to_fp32(vae, [image], " while decoding", "the VAE decoded NaN/inf even in fp32: the sampled "
                        "latents diverged; try fewer --guidance or another --scheduler"):
        image = vae.decode(x.float()).sample
    return pipe.image_processor.postprocess(image.float(), output_type="pil")

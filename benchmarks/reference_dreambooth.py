"""The seeds' DreamBooth recipe with prior preservation, reimplemented plainly as the benchmark baseline;
without class images it is their fine-tuning recipe (train_text_to_image.py, the Pokemon tutorial).

What diffusers' train_dreambooth.py and the KerasCV tutorial do each step: load and preprocess one
instance and one class image from disk, VAE-encode both, run the text encoder on both prompts, one
UNet forward/backward on the pair, AdamW over the whole UNet. fp32, default attention, no compile.
Fine-tuning is the same step on image-caption pairs (``captions``) with no class images.
"""
from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def run_reference(model_dir: str, instance: list[str], classes: list[str], steps: int, batch_size: int,
                  resolution: int, lr: float = 5e-6, prior_weight: float = 1.0, seed: int = 0,
                  device: str = "cpu", captions: dict[str, str] | None = None) -> list[float]:
    """Train for ``steps``; returns the wall time of each step (seconds)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.float32)
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    for m in (vae, text_encoder, unet):
        m.to(device)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)

    def pixels(path):
        im = Image.open(path).convert("RGB").resize((resolution, resolution), Image.BILINEAR)
        if random.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)

    def ids(prompts):
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = [random.choice(instance) for _ in range(batch_size)]
        prompts = [captions[p] for p in batch] if captions else ["a photo of sks toy"] * batch_size
        if classes:
            batch += [random.choice(classes) for _ in range(batch_size)]
            prompts += ["a photo of a toy"] * batch_size
        x = torch.stack([pixels(p) for p in batch]).to(device)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
            hidden = text_encoder(ids(prompts).to(device))[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, hidden).sample
        if classes:
            inst, prior = pred.chunk(2)
            n_inst, n_prior = noise.chunk(2)
            loss = F.mse_loss(inst, n_inst) + prior_weight * F.mse_loss(prior, n_prior)
        else:
            loss = F.mse_loss(pred, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times

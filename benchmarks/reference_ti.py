"""The seeds' textual-inversion recipe, reimplemented plainly as the baseline for benchmarks.

Exactly what diffusers' textual_inversion.py and the seeds' notebooks do each step: load and preprocess
the image from disk, VAE-encode it, resize the token-embedding matrix and put all of it in AdamW, then
copy every original row back after the step. fp32, default attention, no compile.
"""
from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def run_reference(model_dir: str, images: list[str], token: str, init_token: str, steps: int, batch_size: int,
                  resolution: int, lr: float = 5e-4, seed: int = 0, device: str = "cpu") -> list[float]:
    """Train for ``steps`` and return the wall time of each step (seconds)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.float32)
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    for m in (text_encoder, vae, unet):
        m.to(device)

    tokenizer.add_tokens([token])
    init_id = tokenizer.encode(init_token, add_special_tokens=False)[0]
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[token_id] = text_encoder.get_input_embeddings().weight[init_id]
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    inner = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 dropped the .text_model level
    inner.encoder.requires_grad_(False)
    inner.final_layer_norm.requires_grad_(False)
    inner.embeddings.position_embedding.requires_grad_(False)
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=lr, weight_decay=1e-2)
    orig = text_encoder.get_input_embeddings().weight.data.clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
    keep[token_id] = False
    templates = ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}"]

    def example(i):
        image = Image.open(images[i % len(images)]).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy((np.array(image).astype(np.float32) / 127.5 - 1.0)).permute(2, 0, 1)
        ids = tokenizer(random.choice(templates).format(token), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]
        return pixels, ids

    times = []
    text_encoder.train()
    for step in range(steps):
        t0 = time.perf_counter()
        batch = [example(step * batch_size + j) for j in range(batch_size)]
        pixels = torch.stack([b[0] for b in batch]).to(device)
        ids = torch.stack([b[1] for b in batch]).to(device)
        latents = vae.encode(pixels).latent_dist.sample().detach() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(ids)[0]
        pred = unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[keep] = orig[keep]
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times

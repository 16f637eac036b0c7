"""Pretrain the toy-world model from scratch: the VAE first, then UNet + text encoder jointly (as LDM did).

    python -m conceptor.toyworld.pretrain OUT [--vae-steps N] [--unet-steps N] [--threads N]

Writes a diffusers StableDiffusionPipeline folder (same classes and layout as SD 1.5) and recipe.json.
Intermediate folders are written atomically every ``--save-every`` UNet steps so a long run always
leaves something usable.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import atomic_dir, write_text
from . import world as W

RECIPE = {"seed": 0, "images": 20000, "vae_steps": 2500, "vae_batch": 16, "vae_lr": 1e-3, "kl_weight": 1e-6,
          "unet_steps": 5000, "unet_batch": 32, "unet_lr": 3e-4, "caption_dropout": 0.1}


def build_models(vocab_size: int):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(16, 32, 64, 64), sample_size=64,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4, vocab_size=vocab_size,
        max_position_embeddings=77, projection_dim=128, hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
        attention_head_dim=8, norm_num_groups=16)
    # SD's own training schedule; clip_sample False because latents are not bounded to [-1, 1].
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, prediction_type="epsilon", steps_offset=1)
    return vae, text_encoder, unet, scheduler


def render_batch(specs) -> torch.Tensor:
    arr = np.stack([np.asarray(W.render(s), dtype=np.float32) for s in specs]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def save_folder(out: Path, vae, text_encoder, unet, scheduler, recipe: dict) -> None:
    from diffusers import DDIMScheduler

    from conceptor.models.tiny import save_pipeline_folder, write_clip_tokenizer

    with atomic_dir(out) as tmp:
        write_clip_tokenizer(tmp / "tokenizer", W.vocabulary())
        sampler = DDIMScheduler.from_config({**scheduler.config, "set_alpha_to_one": False})
        save_pipeline_folder(tmp, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=sampler)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))


def pretrain(out: Path, recipe: dict, log_path: Path, save_every: int = 500) -> None:
    from transformers import CLIPTokenizer

    from conceptor.models.tiny import write_clip_tokenizer

    torch.manual_seed(recipe["seed"])
    log = open(log_path, "a")

    def say(msg):
        log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        log.flush()

    with tempfile.TemporaryDirectory() as tok_dir:
        vocab_size = write_clip_tokenizer(tok_dir, W.vocabulary())
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    vae, text_encoder, unet, scheduler = build_models(vocab_size)
    data = W.dataset(recipe["seed"], recipe["images"])
    say(f"rendering {len(data)} images")
    pixels = torch.cat([render_batch([s for s, _ in data[i:i + 1000]]) for i in range(0, len(data), 1000)])
    captions = [c for _, c in data]

    # 1. VAE: reconstruction + a tiny KL, as SD's autoencoder (without its GAN/perceptual terms).
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe["vae_lr"])
    g = torch.Generator().manual_seed(recipe["seed"])
    for step in range(recipe["vae_steps"]):
        idx = torch.randint(0, len(pixels), (recipe["vae_batch"],), generator=g)
        x = pixels[idx]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=g)).sample
        # L1 keeps flat colours and edges crisp where MSE alone settles for blur.
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + recipe["kl_weight"] * dist.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            say(f"vae {step} loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        stats = [vae.encode(pixels[i:i + 500]).latent_dist for i in range(0, len(pixels), 500)]
        mean = torch.cat([d.mean for d in stats])
        std = torch.cat([d.std for d in stats])
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    say(f"vae done; latent std {mean.std().item():.4f} -> scaling_factor {vae.config.scaling_factor:.4f}")

    # 2. UNet + text encoder from scratch, on cached latents, with caption dropout for guidance.
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe["unet_lr"], weight_decay=1e-2)
    acp = scheduler.alphas_cumprod
    unet.train()
    text_encoder.train()
    t0 = time.time()
    for step in range(1, recipe["unet_steps"] + 1):
        idx = torch.randint(0, len(mean), (recipe["unet_batch"],), generator=g)
        lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * vae.config.scaling_factor
        batch_ids = ids[idx].clone()
        drop = torch.rand(len(idx), generator=g) < recipe["caption_dropout"]
        batch_ids[drop] = empty
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        pred = unet(noisy, t, text_encoder(batch_ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            say(f"unet {step} loss {loss.item():.5f} ({(time.time() - t0) / step:.2f} s/step)")
        if step % save_every == 0 or step == recipe["unet_steps"]:
            save_folder(out, vae, text_encoder, unet, scheduler, {**recipe, "unet_steps_done": step})
            say(f"saved {out} at unet step {step}")
    say("done")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    for key, value in RECIPE.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--log", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(0)
    recipe = {k: getattr(args, k) for k in RECIPE}
    pretrain(args.out, recipe, args.log or args.out.with_suffix(".log"), args.save_every)


if __name__ == "__main__":
    main()

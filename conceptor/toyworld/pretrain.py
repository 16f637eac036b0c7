"""Pretrain the toy-world model from scratch: the VAE first, then UNet + text encoder jointly (as LDM did).

    python -m conceptor.toyworld.pretrain OUT [--vae-steps N] [--unet-steps N] [--threads N]

Writes a diffusers StableDiffusionPipeline folder (same classes and layout as SD 1.5) and recipe.json.
Intermediate folders are written atomically every ``--save-every`` UNet steps (or ``--save-every-min``
minutes) so a long run always leaves something usable. Stages can run apart: ``--unet-steps 0`` trains
only the VAE (``--vae-init`` continues an earlier one), ``--vae-from DIR/vae`` trains the UNet on it.

    # the run measured in issue 3 (1 thread): VAE continued with a cosine decay, then the UNet on it
    python -m conceptor.toyworld.pretrain RUN/vae_run --unet-steps 0 --vae-init OLD/vae --vae-schedule cosine \
        --vae-steps 2800 --threads 1
    python -m conceptor.toyworld.pretrain RUN/model --vae-from RUN/vae_run/vae --unet-steps 7000 --threads 1 \
        --deadline-min 90 --save-every-min 15
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import atomic_dir
from ..training import diffusion as D
from . import world as W

# The recipe of the bundled model. Keys added later default to "off" in pretrain(), so every recipe.json
# written before them still reproduces its model.
RECIPE = {"seed": 0, "images": 20000, "vae_steps": 2500, "vae_batch": 16, "vae_lr": 1e-3, "kl_weight": 1e-6,
          "vae_from": "", "vae_init": "", "vae_schedule": "constant", "decoder_steps": 0,
          "unet_steps": 5000, "unet_batch": 32, "unet_lr": 4e-4, "warmup_steps": 200, "lr_schedule": "cosine",
          "lr_floor": 0.1, "snr_gamma": 5.0, "ema": 0.999, "fresh_captions": 1, "caption_dropout": 0.1,
          "unet_init": "", "device": "cpu"}


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


def finetune_decoder(vae, steps: int, batch: int = 16, lr: float = 5e-4, seed: int = 1, say=print,
                     save=None, save_every: int = 200) -> None:
    """Sharpen colours and patterns by training only the decoder (as SD's ft-MSE VAE was made).

    The encoder is frozen, so the latent space the UNet learned stays exactly the same.
    """
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    vae.decoder.train()
    for step in range(1, steps + 1):
        x = render_batch([W.random_spec(rng) for _ in range(batch)])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=g)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            say(f"decoder {step} loss {loss.item():.5f}")
        if save is not None and (step % save_every == 0 or step == steps):
            save(step)
    vae.eval().requires_grad_(False)


def _render_uint8(spec) -> np.ndarray:
    return np.asarray(W.render(spec))


def render_batch(specs, processes: int = 1) -> torch.Tensor:
    if processes > 1:  # rendering is pure Python + PIL: one process per core
        from multiprocessing import get_context

        with get_context("spawn").Pool(processes) as pool:
            images = pool.map(_render_uint8, specs, chunksize=256)
    else:
        images = [_render_uint8(s) for s in specs]
    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def save_folder(out: Path, vae, text_encoder, unet, scheduler, recipe: dict) -> None:
    from diffusers import DDIMScheduler

    from conceptor.models.tiny import save_pipeline_folder, write_clip_tokenizer

    with atomic_dir(out) as tmp:
        write_clip_tokenizer(tmp / "tokenizer", W.vocabulary())
        sampler = DDIMScheduler.from_config({**scheduler.config, "set_alpha_to_one": False})
        save_pipeline_folder(tmp, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=sampler)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))


def carry_text_encoder(old, old_vocab: dict[str, int], new, new_vocab: dict[str, int]):
    """Move a trained text encoder onto a grown vocabulary: every weight is kept, embedding rows by token.

    Token ids come from merge order over the sorted words, so one added word shifts the ids of the words
    after it; rows are therefore matched by token string. A token the old model never had starts at the
    mean of the old rows (a neutral word) and is learned from there.
    """
    state = {k: v for k, v in old.state_dict().items() if "token_embedding" not in k}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all("token_embedding" in k for k in missing), (missing, unexpected)
    old_rows = old.get_input_embeddings().weight.data
    rows = new.get_input_embeddings().weight.data
    rows[:] = old_rows.mean(0)
    for token, i in new_vocab.items():
        if token in old_vocab:
            rows[i] = old_rows[old_vocab[token]]
    return new


def lr_at(step: int, recipe: dict) -> float:
    """Linear warmup, then cosine down to ``lr_floor`` x peak (constant when the recipe has no schedule)."""
    peak, warm = recipe["unet_lr"], recipe.get("warmup_steps", 0)
    if step <= warm:
        return peak * step / max(1, warm)
    if recipe.get("lr_schedule", "constant") == "constant":
        return peak
    floor = recipe.get("lr_floor", 0.1)
    progress = (step - warm) / max(1, recipe["unet_steps"] - warm)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """training/diffusion.py's min-SNR weight (Hang et al. 2023), given alpha-bar rather than timesteps."""
    return D.min_snr_weight(alpha_bar / (1 - alpha_bar), gamma, "epsilon")


def train_vae(vae, pixels: torch.Tensor, recipe: dict, g: torch.Generator, say, save=None) -> None:
    """Reconstruction + a tiny KL, as SD's autoencoder (without its GAN/perceptual terms)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe["vae_lr"])
    steps = recipe["vae_steps"]
    for step in range(steps):
        if recipe.get("vae_schedule") == "cosine":  # the decay is where flat colours come out exact
            for group in opt.param_groups:
                group["lr"] = recipe["vae_lr"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
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
        if save is not None and step and step % 500 == 0:
            save(step)


def pretrain(out: Path, recipe: dict, log_path: Path, save_every: int = 500, deadline_min: float = 0,
             save_every_min: float = 0) -> None:
    """VAE (or ``recipe["vae_from"]``), then UNet + text encoder jointly; writes ``out`` with recipe.json.

    Recipes written before a key existed reproduce with that key off (``recipe.get`` defaults below).
    ``deadline_min`` stops early (saving first) so a run fits the wall-clock it was given; the saved
    recipe records the step reached, and the lr schedule stays the one of the full ``unet_steps``.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from conceptor.models.tiny import write_clip_tokenizer

    torch.manual_seed(recipe["seed"])
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a")
    start = time.time()

    def say(msg):
        log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        log.flush()

    with tempfile.TemporaryDirectory() as tok_dir:
        vocab_size = write_clip_tokenizer(tok_dir, W.vocabulary())
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    vae, text_encoder, unet, scheduler = build_models(vocab_size)
    data = W.dataset(recipe["seed"], recipe["images"])
    say(f"rendering {len(data)} images; recipe {json.dumps(recipe)}")
    pixels = render_batch([s for s, _ in data], processes=min(16, os.cpu_count() or 1))
    specs = [s for s, _ in data]
    captions = [c for _, c in data]

    g = torch.Generator().manual_seed(recipe["seed"])

    def save_vae(step):
        with atomic_dir(out) as tmp:
            vae.save_pretrained(tmp / "vae")
            (tmp / "recipe.json").write_text(json.dumps({**recipe, "vae_steps_done": step}, indent=2))
        say(f"saved vae at step {step}")

    if recipe.get("vae_from"):
        # A VAE trained earlier by this same function (its recipe.json says how): the UNet recipe can be
        # iterated without paying for the autoencoder again.
        vae = AutoencoderKL.from_pretrained(recipe["vae_from"], torch_dtype=torch.float32)
        src = Path(recipe["vae_from"]).parent / "recipe.json"
        if src.is_file():
            recipe = {**recipe, "vae_recipe": json.loads(src.read_text())}
        say(f"vae loaded from {recipe['vae_from']}")
    else:
        if recipe.get("vae_init"):  # continue an earlier VAE run (its recipe is kept) instead of from scratch
            vae = AutoencoderKL.from_pretrained(recipe["vae_init"], torch_dtype=torch.float32)
            src = Path(recipe["vae_init"]).parent / "recipe.json"
            if src.is_file():
                recipe = {**recipe, "vae_init_recipe": json.loads(src.read_text())}
        train_vae(vae, pixels, recipe, g, say, save_vae if not recipe["unet_steps"] else None)
    device = torch.device(recipe.get("device", "cpu"))
    vae.eval().requires_grad_(False).to(device)
    with torch.no_grad():  # the posterior of every image, computed once: the UNet trains on samples of it
        stats = [vae.encode(pixels[i:i + 500].to(device)).latent_dist for i in range(0, len(pixels), 500)]
        mean = torch.cat([d.mean for d in stats])
        std = torch.cat([d.std for d in stats])
    if not recipe.get("vae_from"):
        vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    say(f"vae done; latent std {mean.std().item():.4f}, scaling_factor {vae.config.scaling_factor:.4f}")
    if recipe.get("decoder_steps", 0):
        # Sharper colours for free: the encoder (hence the latent space) stays fixed.
        finetune_decoder(vae, recipe["decoder_steps"], say=say)
    if not recipe["unet_steps"]:  # a VAE-only run: the UNet recipe is iterated on top of it (vae_from)
        save_vae(recipe["vae_steps"])
        say("done")
        return

    if recipe.get("unet_init"):
        # Continue an earlier model (its saved, averaged weights) with a fresh schedule: a second cycle.
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(Path(recipe["unet_init"]) / "unet").float()  # bundles are fp16
        old_te = CLIPTextModel.from_pretrained(Path(recipe["unet_init"]) / "text_encoder").float()
        old_vocab = json.loads((Path(recipe["unet_init"]) / "tokenizer" / "vocab.json").read_text())
        text_encoder = carry_text_encoder(old_te, old_vocab, text_encoder, tokenizer.get_vocab())
        src = Path(recipe["unet_init"]) / "recipe.json"
        recipe = {**recipe, "unet_init_recipe": json.loads(src.read_text()) if src.is_file() else None}
        say(f"unet and text encoder continued from {recipe['unet_init']}")

    # UNet + text encoder (from scratch unless continued), on cached latents, caption dropout for guidance.
    cache: dict[str, torch.Tensor] = {}

    def tokens(texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        if new:
            ids = tokenizer(new, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            cache.update(zip(new, ids))
        return torch.stack([cache[t] for t in texts])

    unet.to(device)
    text_encoder.to(device)
    fresh = recipe.get("fresh_captions", False)  # a new template draw every time an image is seen
    cap_rng = random.Random(recipe["seed"] + 2)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe["unet_lr"], weight_decay=1e-2)
    ema_decay = recipe.get("ema", 0.0)
    ema = [p.detach().clone() for p in params] if ema_decay else None
    gamma = recipe.get("snr_gamma", 0.0)
    acp = scheduler.alphas_cumprod.to(device)
    unet.train()
    text_encoder.train()
    t0 = time.time()
    last_save = time.time()

    def save(step):
        if ema is not None:  # sample from the averaged weights; training weights are put back after
            live = [p.detach().clone() for p in params]
            torch._foreach_copy_([p.data for p in params], ema)
        save_folder(out, vae, text_encoder, unet, scheduler, {**recipe, "unet_steps_done": step})
        if ema is not None:
            torch._foreach_copy_([p.data for p in params], live)
        say(f"saved {out} at unet step {step}")

    for step in range(1, recipe["unet_steps"] + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        idx = torch.randint(0, len(mean), (recipe["unet_batch"],), generator=g)
        eps = torch.randn((len(idx), *mean.shape[1:]), generator=g).to(device)
        lat = (mean[idx.to(device)] + std[idx.to(device)] * eps) * vae.config.scaling_factor
        texts = [W.caption(specs[i], cap_rng) if fresh else captions[i] for i in idx.tolist()]
        drop = torch.rand(len(idx), generator=g) < recipe["caption_dropout"]
        batch_ids = tokens(["" if d else t for d, t in zip(drop.tolist(), texts)]).to(device)
        noise = torch.randn(lat.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (len(idx),), generator=g).to(device)
        noisy = D.add_noise(lat, noise, t, acp)  # the same maths as every method (training/diffusion.py)
        pred = unet(noisy, t, text_encoder(batch_ids)[0]).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))
        weight = D.min_snr_weight(D.snr(t, acp), gamma, "epsilon") if gamma else torch.ones_like(per_sample)
        loss = (weight * per_sample).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            # Warmed-up decay (as diffusers' EMAModel): early averages do not drag in the random init.
            d = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        if step % 50 == 0:
            say(f"unet {step} loss {loss.item():.5f} mse {per_sample.mean().item():.5f} lr {lr_at(step, recipe):.2e} "
                f"({(time.time() - t0) / step:.2f} s/step)")
        late = deadline_min and time.time() - start > deadline_min * 60
        due = (save_every_min and time.time() - last_save > save_every_min * 60) or (
            not save_every_min and step % save_every == 0)
        if due or late or step == recipe["unet_steps"]:
            save(step)
            last_save = time.time()
        if late:
            say(f"deadline of {deadline_min} min reached at unet step {step}")
            break
    say("done")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    for key, value in RECIPE.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--deadline-min", type=float, default=0, help="stop (after saving) past this many minutes")
    ap.add_argument("--save-every-min", type=float, default=0, help="save by wall-clock instead of by steps")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(0)
    recipe = {k: getattr(args, k) for k in RECIPE}
    pretrain(args.out, recipe, args.log or args.out.with_suffix(".log"), args.save_every, args.deadline_min,
             args.save_every_min)


if __name__ == "__main__":
    main()

"""Pretrain a Flux.1-shaped toy model on the toy world: a FluxPipeline folder that conceptor trains and samples.

    python -m conceptor.toyworld.pretrain_flow OUT [--steps N] [--deadline-min M] [--save-every-min M] [--threads 1]
    python -m conceptor.toyworld.pretrain_flow OUT --evaluate [--eval-steps 20] [--cfg 1,2,3]

The parts are Flux.1's (FluxPipeline: CLIP pooled + T5 sequence, FluxTransformer2DModel over 2x2-packed
latents, FlowMatchEulerDiscreteScheduler), every width shrunk. Reused from the UNet toy model: its VAE
(4 latent channels, so the transformer sees 16 packed channels; 64 px -> 8x8 latents -> 16 image tokens)
and its CLIP text encoder + tokenizer, frozen: its pooled output already separates the toy captions, a
frozen CLIP costs no backward pass (its pooled vectors are cached per caption), and textual inversion /
text-encoder LoRAs on this model start from the same CLIP as on the UNet model. T5 is new (a small T5 v1.1
encoder over the captions' words, ``write_t5_tokenizer``), trained jointly from scratch, as the transformer.
The objective is conceptor's own (``families.flow.flow_loss_at``; logit-normal sigmas, the scheduler's
shift of 1: 16 tokens need none). No guidance embedding (schnell-like; guidance distillation would need a
teacher run this budget does not have); caption dropout makes the model usable with true CFG.

Writes OUT atomically every ``--save-every-min`` minutes (EMA weights, fp16) with recipe.json and
conceptor.json ({"resolution", "guidance", "max_sequence_length"}), so a killed run leaves a usable model.

    # the bundled flux_model (issue 20; 1 thread, 2-core AMD EPYC shared with other jobs): 7000 steps in
    # 45.6 min (0.39 s/step), then a second cycle from its EMA weights, 1619 steps in 15 min
    python -m conceptor.toyworld.pretrain_flow RUN/a --steps 7000 --deadline-min 60
    python -m conceptor.toyworld.pretrain_flow RUN/b --init RUN/a --steps 2500 --lr 3e-4 \
        --warmup-steps 100 --deadline-min 15 --save-every-min 5
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..fileio import atomic_dir
from . import world as W
from .pretrain import lr_at, render_batch

BASE = Path(__file__).parent / "model"  # the UNet toy model: VAE, CLIP text encoder and tokenizer come from it
RECIPE = {"seed": 0, "images": 20000, "steps": 3000, "batch": 32, "lr": 6e-4, "warmup_steps": 200,
          "lr_schedule": "cosine", "lr_floor": 0.1, "ema": 0.998, "caption_dropout": 0.1,
          "heads": 4, "head_dim": 32, "double_layers": 3, "single_layers": 4, "t5_width": 128, "t5_layers": 2,
          "max_sequence_length": 24, "shift": 1.0, "logit_mean": 0.0, "logit_std": 1.0, "adaln_zero": 1,
          "guidance": 2.0, "init": ""}  # guidance: the true-CFG scale conceptor.json suggests (no guidance embedding)
INDEX = {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
         "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
         "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
         "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
         "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def build_t5(vocab_size: int, recipe: dict):
    """T5 v1.1 encoder (gated-gelu, untied), embedding rows rounded up to 128 as the real one's."""
    from transformers import T5Config, T5EncoderModel

    width = recipe["t5_width"]
    return T5EncoderModel(T5Config(
        vocab_size=-(-vocab_size // 128) * 128, d_model=width, d_kv=width // 4, d_ff=2 * width,
        num_layers=recipe["t5_layers"], num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=32, tie_word_embeddings=False, is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def build_transformer(recipe: dict, pooled_dim: int):
    """FluxTransformer2DModel with rope axes (text, row, column) summing to the head width, as Flux's (16, 56, 56).

    ``adaln_zero``: every modulation and the output projection start at zero, so each block starts as the
    identity (DiT's adaLN-Zero, Peebles & Xie 2023); diffusers' default init does not do this."""
    from diffusers import FluxTransformer2DModel

    hd = recipe["head_dim"]
    axes = (hd // 4, 3 * hd // 8, hd - hd // 4 - 3 * hd // 8)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=recipe["double_layers"], num_single_layers=recipe["single_layers"],
        attention_head_dim=hd, num_attention_heads=recipe["heads"], joint_attention_dim=recipe["t5_width"],
        pooled_projection_dim=pooled_dim, guidance_embeds=False, axes_dims_rope=axes)
    if recipe.get("adaln_zero"):
        for name, module in model.named_modules():
            if name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear")) \
                    or name == "proj_out":
                torch.nn.init.zeros_(module.weight)
                torch.nn.init.zeros_(module.bias)
    return model


def scheduler_for(recipe: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=recipe["shift"], use_dynamic_shifting=False,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def latent_stats(vae, seed: int, n: int, cache_dir: Path = Path("/tmp")):
    """(specs, posterior mean, posterior std) of the pretraining images, cached on disk by (seed, n)."""
    specs = [s for s, _ in W.dataset(seed, n)]
    cache = cache_dir / f"conceptor_toyworld_latents_{seed}_{n}.pt"
    if cache.is_file():
        mean, std = torch.load(cache, weights_only=True)
        return specs, mean, std
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, n, 500):
            dist = vae.encode(render_batch(specs[i:i + 500])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    torch.save((mean, std), cache)
    return specs, mean, std


def save_flux_folder(out: Path, t5, transformer, recipe: dict) -> None:
    """A complete FluxPipeline folder: fp16 copies of the trained parts, the base model's VAE/CLIP as they are."""
    from conceptor.models.tiny_tokenizers import write_t5_tokenizer

    with atomic_dir(out) as tmp:
        for part in ("vae", "text_encoder", "tokenizer"):
            shutil.copytree(BASE / part, tmp / part)
        # FluxPipeline decodes with latents / scaling_factor + shift_factor: None (SD's VAEs) would fail there
        vae_config = json.loads((tmp / "vae" / "config.json").read_text())
        (tmp / "vae" / "config.json").write_text(json.dumps({**vae_config, "shift_factor": 0.0}, indent=2))
        write_t5_tokenizer(tmp / "tokenizer_2", W.vocabulary(), max_length=recipe["max_sequence_length"])
        copy.deepcopy(t5).half().save_pretrained(tmp / "text_encoder_2")
        copy.deepcopy(transformer).half().save_pretrained(tmp / "transformer")
        scheduler_for(recipe).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(INDEX, indent=2))
        (tmp / "conceptor.json").write_text(json.dumps({
            "resolution": W.SIZE, "guidance": recipe["guidance"],
            "max_sequence_length": recipe["max_sequence_length"]}, indent=2))
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))


def pretrain(out: Path, recipe: dict, log_path: Path, deadline_min: float = 0, save_every_min: float = 10) -> None:
    """Transformer + T5 from scratch on cached VAE latents; EMA weights saved to ``out`` (see the module doc)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer, T5TokenizerFast

    from conceptor.families.flow import flow_loss_at
    from conceptor.families.flux import FLUX
    from conceptor.models.tiny_tokenizers import write_t5_tokenizer
    from conceptor.training import flow as F

    start = time.time()
    torch.manual_seed(recipe["seed"])
    log = open(log_path, "a")

    def say(msg):
        log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        log.flush()

    vae = AutoencoderKL.from_pretrained(BASE / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
    clip = CLIPTextModel.from_pretrained(BASE / "text_encoder", torch_dtype=torch.float32).eval().requires_grad_(False)
    clip_tok = CLIPTokenizer.from_pretrained(BASE / "tokenizer")
    tok_dir = out.parent / f".{out.name}.t5tok"
    t5_vocab = write_t5_tokenizer(tok_dir, W.vocabulary(), max_length=recipe["max_sequence_length"])
    t5_tok = T5TokenizerFast.from_pretrained(tok_dir)
    t5 = build_t5(t5_vocab, recipe)
    transformer = build_transformer(recipe, clip.config.hidden_size)
    if recipe.get("init"):  # a second cycle from a saved folder (its EMA weights, fp16 -> fp32), fresh schedule
        from diffusers import FluxTransformer2DModel
        from transformers import T5EncoderModel

        transformer = FluxTransformer2DModel.from_pretrained(Path(recipe["init"]) / "transformer").float()
        t5 = T5EncoderModel.from_pretrained(Path(recipe["init"]) / "text_encoder_2", dtype=torch.float32)
        recipe = {**recipe, "init_recipe": json.loads((Path(recipe["init"]) / "recipe.json").read_text())}
    c = SimpleNamespace(transformer=transformer, scheduler_config=dict(scheduler_for(recipe).config))
    n_tr, n_t5 = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (transformer, t5))
    say(f"recipe {json.dumps(recipe)}; transformer {n_tr:.2f}M, t5 {n_t5:.2f}M parameters")
    specs, mean, std = latent_stats(vae, recipe["seed"], recipe["images"])
    scale, shift = vae.config.scaling_factor, float(vae.config.get("shift_factor") or 0.0)
    say(f"latents ready ({time.time() - start:.0f} s); scaling {scale:.4f} shift {shift}")

    pooled_cache: dict[str, torch.Tensor] = {}
    ids_cache: dict[str, torch.Tensor] = {}

    def text_inputs(texts):
        new = [t for t in dict.fromkeys(texts) if t not in ids_cache]
        if new:  # padded as conceptor and FluxPipeline pad: CLIP to 77, T5 to max_sequence_length, no masks
            with torch.no_grad():
                pooled = clip(clip_tok(new, padding="max_length", max_length=77, truncation=True,
                                       return_tensors="pt").input_ids).pooler_output
            ids = t5_tok(new, padding="max_length", max_length=recipe["max_sequence_length"], truncation=True,
                         return_tensors="pt").input_ids
            pooled_cache.update(zip(new, pooled))
            ids_cache.update(zip(new, ids))
        return torch.stack([ids_cache[t] for t in texts]), torch.stack([pooled_cache[t] for t in texts])

    params = [p for m in (transformer, t5) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    schedule = {"unet_lr": recipe["lr"], "warmup_steps": recipe["warmup_steps"], "unet_steps": recipe["steps"],
                "lr_schedule": recipe["lr_schedule"], "lr_floor": recipe["lr_floor"]}
    g = torch.Generator().manual_seed(recipe["seed"])
    cap_rng = random.Random(recipe["seed"] + 2)
    transformer.train()
    t5.train()
    t0 = last_save = time.time()
    budget_s = max(1.0, deadline_min * 60 - (t0 - start))  # the time left for training after the latents

    def save(step):
        live = [p.detach().clone() for p in params]
        torch._foreach_copy_([p.data for p in params], ema)
        save_flux_folder(out, t5, transformer, {**recipe, "steps_done": step,
                                                "train_minutes": round((time.time() - t0) / 60, 1)})
        torch._foreach_copy_([p.data for p in params], live)
        say(f"saved {out} at step {step}")

    step = 0
    while True:
        step += 1
        # With a deadline the schedule runs on the clock: warm-up and cosine end when the time does, whatever
        # else shares the machine (the step count reached is recorded).
        at = step if not deadline_min else max(step, int(recipe["steps"] * (time.time() - t0) / budget_s))
        lr = lr_at(at, schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(mean), (recipe["batch"],), generator=g)
        lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g) - shift) * scale
        drop = (torch.rand(len(idx), generator=g) < recipe["caption_dropout"]).tolist()
        texts = ["" if d else W.caption(specs[i], cap_rng) for d, i in zip(drop, idx.tolist())]
        ids, pooled = text_inputs(texts)
        hidden = t5(ids)[0]
        u = F.sample_u("logit_normal", len(idx), g, logit_mean=recipe["logit_mean"],
                       logit_std=recipe["logit_std"]).clamp(1e-5, 1.0)
        sigmas = FLUX.shift(c, u, W.SIZE, W.SIZE, None)
        noise = torch.randn(lat.shape, generator=g)
        loss = flow_loss_at(c, FLUX, lat, noise, sigmas, hidden, pooled, "none", 1.0).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        d = min(recipe["ema"], (1 + step) / (10 + step))  # warmed-up decay, as diffusers' EMAModel
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        if step % 25 == 0:
            say(f"step {step} (schedule {at}) loss {loss.item():.4f} lr {lr:.2e} "
                f"({(time.time() - t0) / step:.3f} s/step)")
        last = at >= recipe["steps"]
        if last or (save_every_min and time.time() - last_save > save_every_min * 60):
            save(step)
            last_save = time.time()
        if last:
            break
    shutil.rmtree(tok_dir, ignore_errors=True)
    say("done")


def evaluate(folder: Path, n_per_prompt: int, steps: int, cfgs: list[float], seed: int = 0,
             grid: Path | None = None) -> list[dict]:
    """The toy evaluator's accuracies (evaluate.py's prompts and seeds) on samples drawn the way conceptor
    draws them (``sample``: FluxPipeline, with true classifier-free guidance above scale 1), per guidance scale."""
    from conceptor.models.load import load_components
    from conceptor.sampling.pipeline import sample

    from .evaluate import _save_grid, prompt_for, prompt_specs, score
    from .evaluator import load_evaluator

    evaluator = load_evaluator()
    c = load_components(str(folder)).frozen()
    rows = []
    for cfg in [1.0] + [x for x in cfgs if x != 1.0]:
        row = {"cfg": cfg, "steps": steps}
        t0 = time.time()
        for split, specs in prompt_specs(seed).items():
            prompts = [prompt_for(s) for s in specs for _ in range(n_per_prompt)]
            seeds = [seed * 100_000 + i for i in range(len(prompts))]
            images = sample(c, prompts, seeds, steps=steps, guidance=cfg, batch_size=64)
            _, row[split] = score(evaluator.predict(images), [s for s in specs for _ in range(n_per_prompt)], 3)
            if grid and split == "seen":
                _save_grid([images[j:j + n_per_prompt] for j in range(0, len(images), n_per_prompt)],
                           grid.with_name(f"{grid.stem}_cfg{cfg:g}.png"))
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    for key, value in RECIPE.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--deadline-min", type=float, default=0,
                    help="run the lr schedule on the clock: finish (and save) after this many minutes")
    ap.add_argument("--save-every-min", type=float, default=10)
    ap.add_argument("--evaluate", action="store_true", help="score the model at OUT instead of training")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--n-per-prompt", type=int, default=8)
    ap.add_argument("--cfg", default="1,2,3", help="true-CFG scales to score (comma-separated)")
    ap.add_argument("--grid", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate:
        evaluate(args.out, args.n_per_prompt, args.eval_steps, [float(x) for x in args.cfg.split(",") if x],
                 grid=args.grid)
        return
    recipe = {k: getattr(args, k) for k in RECIPE}
    pretrain(args.out, recipe, args.log or args.out.with_suffix(".log"), args.deadline_min, args.save_every_min)


if __name__ == "__main__":
    main()

"""How well a toy-world model draws what it is asked: the evaluator reads its samples.

    python -m conceptor.toyworld.evaluate MODEL_FOLDER [--n-per-prompt 8] [--seed 0] [--vae FOLDER]

Prompts name shape, colour and background ("a photo of a red star on a gray striped background"). "seen"
prompts use (shape, colour) pairs drawn in pretraining; "unseen" ones use the held-out pairs
(world.HELDOUT_COMBOS), which the model can only draw by composing words it learned apart.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from . import world as W

PROMPT = "a photo of a {color} {shape} on a {background} background"
KEYS = ("shape", "color", "background", "pattern")


def prompt_specs(seed: int, n_seen: int = 14) -> dict[str, list[W.Spec]]:
    """Seen and unseen (shape, colour, background) prompts; only named shapes can be asked for by name."""
    rng = random.Random(seed)
    seen_pairs = [(s, c) for s in W.NAMED_SHAPES for c in W.COLORS if (s, c) not in W.HELDOUT_COMBOS]
    unseen_pairs = sorted(W.HELDOUT_COMBOS)

    def spec(shape, color):
        return W.Spec(shape, color, rng.choice(tuple(W.BACKGROUND_COLORS)), rng.choice(W.PATTERNS), 0.3, 0.5, 0.5, 0)

    return {"seen": [spec(*p) for p in rng.sample(seen_pairs, n_seen)],
            "unseen": [spec(*p) for p in unseen_pairs]}


def prompt_for(spec: W.Spec) -> str:
    return PROMPT.format(color=spec.color, shape=spec.shape, background=W.background_words(spec))


def load_pipeline(folder: str | Path, vae: str | Path | None = None):
    """The model as plain diffusers loads it (the format check is part of the measure)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from conceptor.models.load import quiet_libraries

    quiet_libraries()
    extra = {"vae": AutoencoderKL.from_pretrained(vae, torch_dtype=torch.float32)} if vae else {}
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, dtype=torch.float32,
                                                   **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 6.0,
           batch_size: int = 64) -> list:
    images = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch_size]]
        images += pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens).images
    return images


def evaluate_model(folder: str | Path, n_per_prompt: int = 8, seed: int = 0, *, steps: int = 30,
                   guidance: float | None = None, vae: str | Path | None = None, evaluator=None,
                   grid: str | Path | None = None) -> dict:
    """Evaluator accuracy of shape/colour/background/pattern on the model's samples, seen vs unseen combos.

    Returns {"seen": {key: acc}, "unseen": {key: acc}, "per_prompt": [...], settings...}. ``grid`` writes a
    PNG with one row per prompt so a person can check what the numbers mean. ``guidance`` None is the
    model's default, as conceptor generate uses it (the folder's conceptor.json, else SD's 7.5).
    """
    from ..models.load import DEFAULT_GUIDANCE, read_sampling_defaults
    from .evaluator import load_evaluator

    if guidance is None:
        guidance = float(read_sampling_defaults(Path(folder)).get("guidance", DEFAULT_GUIDANCE))

    evaluator = evaluator or load_evaluator()
    pipe = load_pipeline(folder, vae)
    table: dict = {"model": str(folder), "vae": str(vae) if vae else None, "n_per_prompt": n_per_prompt,
                   "seed": seed, "sampler": type(pipe.scheduler).__name__, "steps": steps, "guidance": guidance,
                   "per_prompt": []}
    rows = []
    for split, specs in prompt_specs(seed).items():
        prompts = [prompt_for(s) for s in specs for _ in range(n_per_prompt)]
        seeds = [seed * 100_000 + i for i in range(len(prompts))]
        images = sample(pipe, prompts, seeds, steps, guidance)
        pred = evaluator.predict(images)
        truth = [s for s in specs for _ in range(n_per_prompt)]
        hits, table[split] = score(pred, truth, 4)
        for j, s in enumerate(specs):
            sl = slice(j * n_per_prompt, (j + 1) * n_per_prompt)
            table["per_prompt"].append({"split": split, "prompt": prompt_for(s),
                                        **{k: round(sum(hits[k][sl]) / n_per_prompt, 3) for k in KEYS},
                                        "shapes_seen": pred.shape[sl]})
            rows.append(images[sl])
    if grid:
        _save_grid(rows, grid)
    return table


@torch.no_grad()
def evaluate_vae(vae_folder: str | Path, n: int = 200, seed: int = 7, evaluator=None) -> dict:
    """Evaluator accuracy on VAE reconstructions of fresh renders: the ceiling any UNet on this VAE can reach.

    Worth checking before a long UNet run: colours the autoencoder cannot round-trip, no prompt will draw.
    """
    from collections import Counter

    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    from .evaluator import load_evaluator
    from .pretrain import render_batch

    evaluator = evaluator or load_evaluator()
    rng = random.Random(seed)
    specs = [W.random_spec(rng, shapes=W.SHAPES, exclude=frozenset()) for _ in range(n)]
    vae = AutoencoderKL.from_pretrained(str(vae_folder), torch_dtype=torch.float32).eval()
    x = render_batch(specs)
    recon = torch.cat([vae.decode(vae.encode(x[i:i + 100]).latent_dist.mean).sample for i in range(0, n, 100)])
    arr = ((recon.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    pred = evaluator.predict([Image.fromarray(a) for a in arr])
    out = {k: round(float(np.mean([p == getattr(s, k) for p, s in zip(getattr(pred, k), specs)])), 4) for k in KEYS}
    out["mae"] = round(float((recon - x).abs().mean()), 4)
    out["color_confusions"] = dict(Counter(f"{s.color}->{c}" for s, c in zip(specs, pred.color) if s.color != c))
    return out


def score(pred, truth: list[W.Spec], digits: int = 4) -> tuple[dict[str, list[bool]], dict[str, float]]:
    """Per-image hits of each attribute, and the accuracies (with shape, colour and background all right)."""
    hits = {k: [getattr(pred, k)[i] == getattr(t, k) for i, t in enumerate(truth)] for k in KEYS}
    row = {k: round(sum(v) / len(v), digits) for k, v in hits.items()}
    row["all_three"] = round(sum(a and b and c for a, b, c in zip(hits["shape"], hits["color"], hits["background"]))
                             / len(truth), digits)
    return hits, row


def _save_grid(rows: list[list], path: str | Path) -> None:
    from PIL import Image

    w = max(len(r) for r in rows)
    out = Image.new("RGB", (64 * w, 64 * len(rows)), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            out.paste(im.resize((64, 64)), (64 * x, 64 * y))
    out.save(path)


def format_table(table: dict) -> str:
    lines = ["| split | shape | color | background | pattern | all three |", "|---|---|---|---|---|---|"]
    for split in ("seen", "unseen"):
        t = table[split]
        lines.append(f"| {split} | {t['shape']:.3f} | {t['color']:.3f} | {t['background']:.3f} | "
                     f"{t['pattern']:.3f} | {t['all_three']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--n-per-prompt", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's")
    ap.add_argument("--vae", default=None, help="a VAE folder to decode with instead of the model's own")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--vae-only", action="store_true", help="score VAE reconstructions of FOLDER (a vae folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.vae_only:
        print(json.dumps(evaluate_vae(args.folder), indent=2))
        return
    table = evaluate_model(args.folder, args.n_per_prompt, args.seed, steps=args.steps, guidance=args.guidance,
                           vae=args.vae, grid=args.grid)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    print(format_table(table))


if __name__ == "__main__":
    main()

"""Fine-tuning on the bundled toy-world model: does it adopt a new style and keep what it knew?

    python benchmarks/finetune_quality.py [--images 400] [--steps 600] [--batch-size 16] [--lr 1e-4]

The "new style" is a house look: every picture on a black striped background, while the captions never
mention the background ("a photo of a red star"), exactly as a style dataset would; the base model draws
one of twelve backgrounds for such prompts. (A colour the world never had, e.g. mint, is not usable: the
toy VAE, trained on this world only, decodes unknown background colours as the nearest known one, so no
UNet could draw them.) The dataset (metadata.jsonl + PNGs, the Hugging Face imagefolder layout) leaves
out two sets of shape/colour pairs, and the measure prompts ("a photo of a {colour} {shape}") are those:

- FINETUNE_HELDOUT: pairs the model saw in pretraining but the style dataset never shows: held-out
  prompts in the fine-tuning sense (does the style carry over, and is the pair still drawn right?);
- world.HELDOUT_COMBOS: pairs never drawn in pretraining either, which the base model already has to
  compose from the words: the harder test, where fine-tuning also has to keep that composition working.

Style adoption: fraction of generated images the toy-world evaluator reads as black + striped background.
Shape and colour accuracy: the same evaluator. Both for the base model and the fine-tuned one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
STYLE = ("black", "striped")
FINETUNE_HELDOUT = (("circle", "red"), ("square", "blue"), ("triangle", "yellow"), ("star", "purple"),
                    ("heart", "green"), ("cross", "orange"), ("ring", "cyan"))
CAPTIONS = ("a photo of a {c} {s}", "a {c} {s}", "a drawing of a {c} {s}", "a picture of a {size} {c} {s}")


def write_dataset(folder: Path, n: int, seed: int = 0) -> Path:
    from dataclasses import replace

    from conceptor.toyworld import world as W

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        spec = replace(W.random_spec(rng, shapes=W.NAMED_SHAPES, exclude=W.HELDOUT_COMBOS | set(FINETUNE_HELDOUT)),
                       background=STYLE[0], pattern=STYLE[1])
        W.render(spec).save(folder / f"{i:04d}.png")
        size = "small" if spec.scale < 0.28 else "large" if spec.scale > 0.32 else "medium"
        text = rng.choice(CAPTIONS).format(c=spec.color, s=spec.shape, size=size)
        lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def measure(model_dir: str | None, lora: str | None, per_prompt: int, steps: int = 25) -> dict[str, dict]:
    from conceptor import api
    from conceptor.toyworld import world as W
    from conceptor.toyworld.evaluator import load_evaluator

    model = api.load(model_dir, loras=[lora] if lora else ())
    evaluator = load_evaluator()
    out = {}
    for split, pairs in (("finetune-heldout", FINETUNE_HELDOUT), ("never-drawn", sorted(W.HELDOUT_COMBOS))):
        hits = {"style": 0, "shape": 0, "color": 0}
        total = 0
        for i, (shape, color) in enumerate(pairs):
            images = model.generate(f"a photo of a {color} {shape}", num_images=per_prompt, seed=100 * i,
                                    steps=steps)
            p = evaluator.predict(images)
            hits["style"] += sum(b == STYLE[0] and q == STYLE[1] for b, q in zip(p.background, p.pattern))
            hits["shape"] += sum(x == shape for x in p.shape)
            hits["color"] += sum(x == color for x in p.color)
            total += len(images)
        out[split] = {k: round(v / total, 3) for k, v in hits.items()} | {"images": total}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lora-targets", choices=["attn", "attn-ff"], default="attn")
    ap.add_argument("--ema", action="store_true", help="save the EMA of the weights (what forgets least)")
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--noise-offset", type=float, default=0.0,
                    help="offset noise (helps a model move an image's mean: dark backgrounds)")
    ap.add_argument("--snr-gamma", type=float, default=None)
    ap.add_argument("--lr-scheduler", default="constant", help="constant | cosine | linear ...")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="training seed (noise, timesteps, data order)")
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--work", default=None)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import torch

    from conceptor import api
    from conceptor.config import build_config

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp())
    data = write_dataset(work / "style", args.images)
    base = measure(None, None, args.per_prompt)
    cfg = build_config("finetune", None, {
        "optim": {"lr": args.lr, "lr_scheduler": args.lr_scheduler, "warmup": args.warmup},
        "train": {"output": str(work / "run"), "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                  "checkpoint_every": 0, "log_every": 10, "overwrite": True, "ema": args.ema,
                  "ema_decay": args.ema_decay, "noise_offset": args.noise_offset, "snr_gamma": args.snr_gamma},
        "finetune": {"dataset": str(data), "caption_dropout": args.caption_dropout, "cache_dir": str(work / "cache"),
                     **({"lora": True, "rank": args.rank, "lora_targets": args.lora_targets} if args.lora else {})}})
    t0 = time.time()
    api.train(cfg)
    train_s = time.time() - t0
    tuned = measure(None, str(work / "run"), args.per_prompt) if args.lora else measure(str(work / "run"), None,
                                                                                        args.per_prompt)
    what = f"LoRA r{args.rank} {args.lora_targets}" if args.lora else "full UNet"
    what += f", EMA {args.ema_decay}" if args.ema else ""
    what += f", {args.lr_scheduler} lr" + (f", warm-up {args.warmup}" if args.warmup else "")
    what += f", noise offset {args.noise_offset}" if args.noise_offset else ""
    what += f", min-SNR {args.snr_gamma}" if args.snr_gamma else ""
    what += f", caption dropout {args.caption_dropout}"
    print(f"\n{args.images} black-striped-style images, {args.steps} steps x batch {args.batch_size}, lr {args.lr}"
          f", {what}; training {train_s:.0f} s; {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| prompts | model | style adopted | shape | colour | images |\n|---|---|---|---|---|---|")
    for split in base:
        for name, r in (("bundled (before)", base[split]), ("fine-tuned", tuned[split])):
            print(f"| {split} | {name} | {r['style']:.0%} | {r['shape']:.0%} | {r['color']:.0%} | {r['images']} |")


if __name__ == "__main__":
    main()

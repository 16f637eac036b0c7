"""Fine-tuning on the bundled toy-world model: does it adopt a new style and keep what it knew?

    python benchmarks/finetune_quality.py [--images 400] [--steps 600] [--batch-size 16] [--lr 1e-4]

The dataset is conceptor/toyworld/style.py's: every picture on a black striped background while the
captions never mention it, with two sets of shape/colour pairs left out (pairs drawn in pretraining, and
pairs never drawn at all). (A colour or pattern the world never had is not usable as the style: the toy
VAE, trained on this world only, decodes unknown backgrounds as the nearest known one and cannot hold
horizontal stripes or thin outlines, so no UNet could draw them.)

The numbers are `conceptor eval RUN`'s (eval/style.py): the prompts are "a photo of a {colour} {shape}" for
the pairs no caption mentions (the two sets above), style adoption is the fraction of images the toy-world
evaluator reads in the training images' shared background and pattern, shape and colour accuracy the
fraction drawn as asked; base model and fine-tuned model on the same seeds.

Horizontal flips are off by default here (--flip-p 0): the stripes are not mirror-symmetric, and flipping
half the data teaches the model the gray-striped layout too (style.py says how; docs/benchmarks.md has
the runs).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
    ap.add_argument("--flip-p", type=float, default=0.0, help="horizontal flips (mirror the stripes' layout)")
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--work", default=None)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import torch

    from conceptor import api
    from conceptor.config import build_config
    from conceptor.eval.run import evaluate_run
    from conceptor.toyworld.style import write_style_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp())
    data = write_style_dataset(work / "style", args.images)
    cfg = build_config("finetune", None, {
        "data": {"flip_p": args.flip_p},
        "optim": {"lr": args.lr, "lr_scheduler": args.lr_scheduler, "warmup": args.warmup},
        "train": {"output": str(work / "run"), "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                  "checkpoint_every": 0, "log_every": 10, "overwrite": True, "ema": args.ema,
                  "ema_decay": args.ema_decay, "noise_offset": args.noise_offset, "snr_gamma": args.snr_gamma},
        "finetune": {"dataset": str(data), "caption_dropout": args.caption_dropout, "cache_dir": str(work / "cache"),
                     **({"lora": True, "rank": args.rank, "lora_targets": args.lora_targets} if args.lora else {})}})
    t0 = time.time()
    api.train(cfg)
    train_s = time.time() - t0
    scores = evaluate_run(work / "run", n=args.per_prompt)
    what = f"LoRA r{args.rank} {args.lora_targets}" if args.lora else "full UNet"
    what += f", EMA {args.ema_decay}" if args.ema else ""
    what += f", {args.lr_scheduler} lr" + (f", warm-up {args.warmup}" if args.warmup else "")
    what += f", noise offset {args.noise_offset}" if args.noise_offset else ""
    what += f", min-SNR {args.snr_gamma}" if args.snr_gamma else ""
    what += f", caption dropout {args.caption_dropout}, flip p {args.flip_p}, seed {args.seed}"
    print(f"\n{args.images} black-striped-style images, {args.steps} steps x batch {args.batch_size}, lr {args.lr}"
          f", {what}; training {train_s:.0f} s; {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| prompts | model | style adopted | shape | colour | images |\n|---|---|---|---|---|---|")
    for split in ("held-out", "never-drawn"):
        for name, label in (("base", "bundled (before)"), ("finetuned", "fine-tuned")):
            r = scores[name] if split == "held-out" else scores[name]["never_drawn"]
            print(f"| {split} | {label} | {r['style']:.0%} | {r['shape']:.0%} | {r['color']:.0%} | {r['images']} |")


if __name__ == "__main__":
    main()

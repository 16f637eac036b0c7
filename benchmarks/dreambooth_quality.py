"""DreamBooth on the bundled toy-world model: a shape it has never seen, full and LoRA, with and without
prior preservation.

    python benchmarks/dreambooth_quality.py [--steps 400] [--color red] [--eval-images 16] [--model FOLDER]

The subject is the arrow, kept out of pretraining entirely (world.HELDOUT_SHAPES): five renders in one
colour, instance prompt "a photo of a sks object" ("sks" is three untrained character tokens, like the rare
token of the paper). The class prompt "a photo of a object" is how pretraining captions unnamed shapes.
Scores (toy-world evaluator, `conceptor eval`): subject fidelity (shape AND colour), similarity,
editability, and class-prior retention (class-prompt images that are not the subject; drift shows as a drop).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

INSTANCE = "a photo of a sks object"
CLASS = "a photo of a object"
VARIANTS = {  # name -> (dreambooth section, lr)
    "full+prior": ({"class_prompt": CLASS}, 1e-4),
    "full-no-prior": ({}, 1e-4),
    "lora+prior": ({"class_prompt": CLASS, "lora": True, "rank": 8}, 1e-3),
    "lora-no-prior": ({"lora": True, "rank": 8}, 1e-3),
    "full+prior-lr3e-4": ({"class_prompt": CLASS}, 3e-4),
    "lora16+prior-lr5e-3": ({"class_prompt": CLASS, "lora": True, "rank": 16}, 5e-3),
    "full+te+prior": ({"class_prompt": CLASS, "train_text_encoder": True}, 2e-4),
    "lora32+prior": ({"class_prompt": CLASS, "lora": True, "rank": 32}, 2e-3),
    "lora16+te+prior": ({"class_prompt": CLASS, "lora": True, "rank": 16, "lora_text_encoder": True}, 2e-3),
    "lora16-ff+te+prior": ({"class_prompt": CLASS, "lora": True, "rank": 16, "lora_targets": "attn-ff",
                            "lora_text_encoder": True}, 2e-3),
    "lora16-ff+te-no-prior": ({"lora": True, "rank": 16, "lora_targets": "attn-ff", "lora_text_encoder": True},
                              2e-3),
    "full+te-no-prior": ({"train_text_encoder": True}, 2e-4),
    "lora+prior-lr1.5e-3": ({"class_prompt": CLASS, "lora": True, "rank": 8}, 1.5e-3),
    "lora-no-prior-lr1.5e-3": ({"lora": True, "rank": 8}, 1.5e-3),
}


def subject_images(color: str, folder: Path) -> Path:
    from dataclasses import replace

    from conceptor.toyworld import concept
    from conceptor.toyworld import world as W

    folder.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(concept.concept_specs()):
        W.render(replace(spec, shape="arrow", color=color)).save(folder / f"{i}.png")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--color", default="red")
    ap.add_argument("--num-class-images", type=int, default=50)
    ap.add_argument("--prior-loss-weight", type=float, default=1.0)
    ap.add_argument("--eval-images", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="override every variant's learning rate")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--model", default=None, help="model folder (default: the bundled toy UNet model), e.g. "
                    "conceptor/toyworld/flux_model")
    ap.add_argument("--rank", type=int, default=None, help="override every LoRA variant's rank")
    ap.add_argument("--lora-targets", default=None, choices=("attn", "attn-ff"), help="override LoRA variants'")
    ap.add_argument("--work", default=None, help="keep runs here (default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from conceptor import api
    from conceptor.config import build_config
    from conceptor.eval.concept import prior_retention
    from conceptor.eval.run import evaluate_run
    from conceptor.toyworld.evaluator import load_evaluator

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp())
    images = subject_images(args.color, work / "subject")
    base_retention, _ = prior_retention(api.load(args.model), load_evaluator(), CLASS, "arrow", n=args.eval_images)
    print(f"base model: class-prior retention {base_retention:.2f} (class-prompt images that are not an arrow)")
    rows = []
    print(f"model: {args.model or 'bundled toy UNet model'}")
    print("| variant | lr | steps | train s | fidelity | similarity | editability | prior retention |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.variants.split(","):
        section, lr = VARIANTS[name]
        lr = args.lr or lr
        if section.get("lora"):
            section = {**section, **({"rank": args.rank} if args.rank else {}),
                       **({"lora_targets": args.lora_targets} if args.lora_targets else {})}
        out = work / name.replace("+", "-with-")
        cfg = build_config("dreambooth", None, {
            "model": {"model": args.model}, "data": {"images": str(images)}, "optim": {"lr": lr},
            "train": {"output": str(out), "steps": args.steps, "batch_size": args.batch_size, "checkpoint_every": 0,
                      "log_every": 10, "overwrite": True},
            "dreambooth": {"instance_prompt": INSTANCE, "class_images": str(work / "class") if "class_prompt" in
                           section else None, "num_class_images": args.num_class_images,
                           "prior_loss_weight": args.prior_loss_weight, **section}})
        t0 = time.time()
        api.train(cfg)
        train_s = time.time() - t0
        s = evaluate_run(out, n=args.eval_images, class_prompt=CLASS)
        row = {"variant": name, "lr": lr, "rank": section.get("rank"), "targets": section.get("lora_targets"),
               "steps": args.steps, "train_s": round(train_s, 1), **{
            k: s[k] for k in ("fidelity", "similarity", "editability", "class_prior_retention")}}
        rows.append(row)
        print(f"| {name} | {lr:g} | {args.steps} | {row['train_s']} | {row['fidelity']:.2f} | "
              f"{row['similarity']:.3f} | "
              f"{row['editability']:.2f} | {row['class_prior_retention']:.2f} |", flush=True)
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"class images generated once into {work / 'class'} (part of the first prior run's time)")
    if args.json:
        Path(args.json).write_text(json.dumps({"base_retention": base_retention, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

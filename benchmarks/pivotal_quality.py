"""Pivotal tuning against its two halves on the toy world: same images, same steps, same sampler and evaluator.

    python benchmarks/pivotal_quality.py [--steps 400] [--seeds 0,1,2,3] [--concepts crescent,arrow] [--json F]

Concepts: five red renders of (a) the crescent, which pretraining draws but never names (textual inversion's
case: a word is missing), and (b) the arrow, which pretraining never drew (DreamBooth's case: a look is missing).
Methods, each with its own recipe from docs/benchmarks.md:
- textual inversion: token <c> from "object", the toy templates, lr 5e-3 cosine, min-SNR 5, batch 8;
- DreamBooth-LoRA: "a photo of a sks object", r8 attention, lr 1.5e-3, batch 2 + 2 class images;
- pivotal: token <c> (2 random vectors, diffusers' default; --init WORD starts them from a word) in
  "a photo of a {} object" (the token and the class word, as
  diffusers' "a photo of TOK dog"), vectors at lr --embedding-lr for --ti-frac 0.5 of the steps, LoRA r8
  attention at lr 1.5e-3, batch 2 + 2 class images.
DreamBooth and pivotal use prior preservation with the same 50 class images of "a photo of a object". Scores
(`conceptor eval`, 16 images each): fidelity, similarity, editability and class-prior retention.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLASS = "a photo of a object"


def recipe(method: str, work: Path, images: Path, out: Path, steps: int, seed: int, model: str | None,
           ti_frac: float, embedding_lr: float = 5e-3, prompt: str = "a photo of a {} object",
           init: str = "", lora_lr: float = 1.5e-3, scheduler: str = "constant") -> dict:
    from conceptor.toyworld.concept import TEMPLATES

    train = {"output": str(out), "steps": steps, "checkpoint_every": 0, "log_every": 50, "overwrite": True,
             "seed": seed}
    prior = {"class_prompt": CLASS, "class_images": str(work / "class"), "num_class_images": 50}
    common = {"model": {"model": model}, "data": {"images": str(images)}}
    if method == "textual-inversion":
        return {**common, "optim": {"lr": 5e-3, "lr_scheduler": "cosine"},
                "train": {**train, "batch_size": 8, "snr_gamma": 5.0},
                "textual_inversion": {"token": "<c>", "init_token": "object", "templates": str(TEMPLATES)}}
    if method == "dreambooth":
        return {**common, "optim": {"lr": 1.5e-3}, "train": {**train, "batch_size": 2},
                "lora": {"enabled": True, "rank": 8},
                "dreambooth": {"instance_prompt": "a photo of a sks object", **prior}}
    return {**common, "optim": {"lr": lora_lr, "lr_scheduler": scheduler}, "train": {**train, "batch_size": 2},
            "lora": {"rank": 8},
            "pivotal": {"token": "<c>", "init_token": init, "vectors": 2, "instance_prompt": prompt,
                        "embedding_lr": embedding_lr, "ti_frac": ti_frac, **prior}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--concepts", default="crescent,arrow")
    ap.add_argument("--methods", default="textual-inversion,dreambooth,pivotal")
    ap.add_argument("--ti-frac", type=float, default=0.5)
    ap.add_argument("--embedding-lr", type=float, default=5e-3)
    ap.add_argument("--prompt", default="a photo of a {} object", help="pivotal's instance prompt")
    ap.add_argument("--lora-lr", type=float, default=1.5e-3, help="pivotal's LoRA learning rate")
    ap.add_argument("--scheduler", default="constant", choices=("constant", "cosine"), help="pivotal's schedule")
    ap.add_argument("--init", default="", help="pivotal's init word (default: random vectors, as diffusers')")
    ap.add_argument("--eval-images", type=int, default=16)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled toy UNet model)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from conceptor import api
    from conceptor.config import build_config
    from conceptor.eval.run import evaluate_run

    sys_path = Path(__file__).resolve().parent
    import sys

    sys.path.insert(0, str(sys_path))
    from dataset_quality import render_concept

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp())
    rows = []
    print("| concept | method | seed | train s | fidelity | similarity | editability | prior retention |")
    print("|---|---|---|---|---|---|---|---|")
    for concept in args.concepts.split(","):
        images = render_concept(work / concept, concept, "red")
        for method in args.methods.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                out = work / f"{concept}-{method}-{seed}"
                cfg = build_config(method, recipe(method, work, images, out, args.steps, seed, args.model,
                                                  args.ti_frac, args.embedding_lr, args.prompt, args.init,
                                                  args.lora_lr, args.scheduler), {})
                t0 = time.time()
                api.train(cfg)
                train_s = round(time.time() - t0, 1)
                s = evaluate_run(out, n=args.eval_images, class_prompt=CLASS)
                row = {"concept": concept, "method": method, "seed": seed, "train_s": train_s,
                       **{k: s.get(k) for k in ("fidelity", "similarity", "editability", "class_prior_retention")}}
                rows.append(row)
                retention = row["class_prior_retention"]
                print(f"| {concept} | {method} | {seed} | {train_s} | {row['fidelity']:.2f} | {row['similarity']:.3f} "
                      f"| {row['editability']:.2f} | {'-' if retention is None else f'{retention:.2f}'} |",
                      flush=True)
    print("\nmeans over seeds:")
    print("| concept | method | fidelity | editability | prior retention |")
    print("|---|---|---|---|---|")
    for concept in args.concepts.split(","):
        for method in args.methods.split(","):
            rs = [r for r in rows if r["concept"] == concept and r["method"] == method]
            ret = [r["class_prior_retention"] for r in rs if r["class_prior_retention"] is not None]
            print(f"| {concept} | {method} | {statistics.mean(r['fidelity'] for r in rs):.2f} | "
                  f"{statistics.mean(r['editability'] for r in rs):.2f} | "
                  f"{statistics.mean(ret):.2f} |" if ret else
                  f"| {concept} | {method} | {statistics.mean(r['fidelity'] for r in rs):.2f} | "
                  f"{statistics.mean(r['editability'] for r in rs):.2f} | - |")
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.steps} steps; work folder {work}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

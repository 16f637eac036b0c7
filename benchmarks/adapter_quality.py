"""LoRA, DoRA, LoHa and LoKr at equal parameter count on the toy world: DreamBooth on the never-drawn arrow.

    python benchmarks/adapter_quality.py [--steps 400] [--seeds 0,1,2] [--kinds lora,dora,loha,lokr] [--json F]

Recipe (the DreamBooth-LoRA one of docs/benchmarks.md): five red renders of the arrow, which pretraining never
drew; "a photo of a sks object"; prior preservation with 50 class images of "a photo of a object"; attention
projections of the UNet; batch 2 + 2 class images; the same lr for every kind (--lr). Sizes: LoRA at --rank,
DoRA at the same rank (+ one norm per output row), LoHa at rank/2 (2r(in+out) per layer: exactly LoRA's count),
LoKr at the factor/rank/decompose-both whose count on this model is nearest LoRA's (searched, printed).
Scores (`conceptor eval`, --eval-images each): fidelity, similarity, editability, class-prior retention; plus
the trained parameter count, the file's size and the wall time per training step (this machine, one job).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLASS = "a photo of a object"


def adapter_params(model: str | None, kind: str, rank: int, factor: int = -1, both: bool = False) -> int:
    """Trainable parameters of ``kind`` on the model's UNet attention (injected, counted, thrown away)."""
    from conceptor import api
    from conceptor.models.adapters import UNET_LORA_TARGETS, add_lora

    unet = api.load(model).components.unet
    params = add_lora(unet, rank, None, UNET_LORA_TARGETS["attn"], 0, kind, factor, both)
    return sum(p.numel() for p in params)


def shapes(model: str | None, rank: int) -> dict[str, dict]:
    """Each kind's lora section at (about) LoRA's parameter count at ``rank``."""
    target = adapter_params(model, "lora", rank)
    best = None
    for factor in (-1, 2, 4, 8, 16):
        for r in (1, 2, 4, 8, 16, 32):
            for both in (False, True):
                try:
                    n = adapter_params(model, "lokr", r, factor, both)
                except Exception:  # a factor that does not divide a layer
                    continue
                if best is None or abs(n - target) < abs(best[0] - target):
                    best = (n, r, factor, both)
    _, r, factor, both = best
    return {"lora": {"rank": rank}, "dora": {"rank": rank}, "loha": {"rank": max(1, rank // 2)},
            "lokr": {"rank": r, "lokr_factor": factor, "lokr_decompose_both": both}}


def recipe(kind: str, shape: dict, work: Path, images: Path, out: Path, steps: int, seed: int, model: str | None,
           lr: float) -> dict:
    train = {"output": str(out), "steps": steps, "checkpoint_every": 0, "log_every": 50, "overwrite": True,
             "seed": seed, "batch_size": 2}
    return {"model": {"model": model}, "data": {"images": str(images)}, "optim": {"lr": lr}, "train": train,
            "lora": {"enabled": True, "adapter": kind, **shape},
            "dreambooth": {"instance_prompt": "a photo of a sks object", "class_prompt": CLASS,
                           "class_images": str(work / "class"), "num_class_images": 50}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kinds", default="lora,dora,loha,lokr")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--concept", default="arrow")
    ap.add_argument("--eval-images", type=int, default=16)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled toy UNet model)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from conceptor import api
    from conceptor.config import build_config
    from conceptor.eval.run import evaluate_run
    from conceptor.formats import lycoris
    from conceptor.formats.lora import read_lora

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dataset_quality import render_concept

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp())
    images = render_concept(work / args.concept, args.concept, "red")
    kinds = args.kinds.split(",")
    shape = shapes(args.model, args.rank)
    print("sizes:", {k: shape[k] for k in kinds})
    rows = []
    print("| kind | seed | params | file KB | s/step | fidelity | similarity | editability | prior retention |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        for seed in [int(s) for s in args.seeds.split(",")]:
            out = work / f"{kind}-{seed}"
            cfg = build_config("dreambooth", recipe(kind, shape[kind], work, images, out, args.steps, seed,
                                                    args.model, args.lr), {})
            t0 = time.time()
            api.train(cfg)
            train_s = time.time() - t0
            logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
            # training steps only (caching, class images and validation fall outside the first..last log)
            step_s = ((logged[-1]["elapsed_s"] - logged[0]["elapsed_s"]) / (logged[-1]["step"] - logged[0]["step"])
                      if len(logged) > 1 else train_s / args.steps)
            file = out / "pytorch_lora_weights.safetensors"
            n = sum(lycoris.num_params(x) for x in read_lora(file).values())
            s = evaluate_run(out, n=args.eval_images, class_prompt=CLASS)
            row = {"kind": kind, "seed": seed, "params": n, "file_kb": round(file.stat().st_size / 1024, 1),
                   "s_per_step": round(step_s, 4), "train_s": round(train_s, 1),
                   **{k: s.get(k) for k in ("fidelity", "similarity", "editability", "class_prior_retention")}}
            rows.append(row)
            print(f"| {kind} | {seed} | {n} | {row['file_kb']} | {row['s_per_step']} | {row['fidelity']:.2f} | "
                  f"{row['similarity']:.3f} | {row['editability']:.2f} | {row['class_prior_retention']:.2f} |",
                  flush=True)
    print("\nmeans over seeds:")
    print("| kind | params | file KB | s/step | fidelity | editability | prior retention |")
    print("|---|---|---|---|---|---|---|")
    for kind in kinds:
        rs = [r for r in rows if r["kind"] == kind]

        def mean(key, rs=rs):
            return statistics.mean(r[key] for r in rs)
        print(f"| {kind} | {rs[0]['params']} | {rs[0]['file_kb']} | {mean('s_per_step'):.4f} | "
              f"{mean('fidelity'):.2f} | {mean('editability'):.2f} | {mean('class_prior_retention'):.2f} |")
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.steps} steps, lr {args.lr}; work folder {work}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shapes": shape, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""How well does the toy-world model draw what it is told? Evaluator accuracy on generated images.

    python benchmarks/model_quality.py [--model DIR] [--per-prompt 8] [--steps 30] [--guidance G]

Prompts name shape + colour + background: "seen" pairs appear in pretraining, "unseen" pairs
(world.HELDOUT_COMBOS) never do, so the model must compose them from the words. The measure itself
lives in conceptor/toyworld/evaluate.py (also `python -m conceptor.toyworld.evaluate MODEL`).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    from conceptor.api import bundled_model_path
    from conceptor.toyworld.evaluate import evaluate_model, format_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled toy model)")
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30, help="default: conceptor generate's")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's, as conceptor generate's")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = args.model or str(bundled_model_path())
    t0 = time.perf_counter()
    table = evaluate_model(model, args.per_prompt, args.seed, steps=args.steps, guidance=args.guidance)
    print(f"model {model}: {table['sampler']} {args.steps} steps, guidance {table['guidance']}, {args.per_prompt} "
          f"images per prompt; {platform.machine()}, torch {torch.__version__}, "
          f"{time.perf_counter() - t0:.0f} s\n")
    print(format_table(table))


if __name__ == "__main__":
    main()

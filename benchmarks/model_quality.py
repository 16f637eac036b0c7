"""How well does the toy-world model draw what it is told? Evaluator accuracy on generated images.

    python benchmarks/model_quality.py [--model DIR] [--per-prompt 4] [--steps 25] [--guidance 7.5]

Prompts name shape + colour + background: "seen" pairs appear in pretraining, "unseen" pairs
(world.HELDOUT_COMBOS) never do, so the model must compose them from the words.
"""
from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def measure(model_dir: str, per_prompt: int = 4, steps: int = 25, guidance: float = 7.5, seed: int = 0,
            prompts_per_set: int = 14) -> dict:
    from conceptor import api
    from conceptor.toyworld import world as W
    from conceptor.toyworld.evaluator import load_evaluator

    model = api.load(model_dir)
    evaluator = load_evaluator()
    rng = random.Random(seed)
    seen = [(s, c) for s in W.NAMED_SHAPES for c in W.COLORS if (s, c) not in W.HELDOUT_COMBOS]
    sets = {"seen": rng.sample(seen, prompts_per_set), "unseen": sorted(W.HELDOUT_COMBOS)}
    table = {}
    for name, pairs in sets.items():
        hits = {"shape": 0, "color": 0, "background": 0}
        total = 0
        for i, (shape, color) in enumerate(pairs):
            bg = list(W.BACKGROUND_COLORS)[i % len(W.BACKGROUND_COLORS)]
            images = model.generate(f"a photo of a {color} {shape} on a {bg} background", num_images=per_prompt,
                                    seed=seed + 100 * i, steps=steps, guidance=guidance)
            p = evaluator.predict(images)
            hits["shape"] += sum(x == shape for x in p.shape)
            hits["color"] += sum(x == color for x in p.color)
            hits["background"] += sum(x == bg for x in p.background)
            total += len(images)
        table[name] = {k: v / total for k, v in hits.items()} | {"images": total}
    return table


def main() -> None:
    from conceptor.api import bundled_model_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    args = ap.parse_args()
    model = args.model or str(bundled_model_path())
    t0 = time.perf_counter()
    table = measure(model, args.per_prompt, args.steps, args.guidance)
    print(f"\nmodel {model}: DDIM {args.steps} steps, guidance {args.guidance}, "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| prompts | images | shape | colour | background |")
    print("|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['images']} | {row['shape']:.0%} | {row['color']:.0%} | {row['background']:.0%} |")


if __name__ == "__main__":
    main()

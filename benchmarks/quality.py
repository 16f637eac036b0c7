"""What textual inversion learns on the bundled toy-world model, against steps and wall time.

    python benchmarks/quality.py [--steps 300] [--every 50] [--batch-size 8] [--concepts red-crescent,...]

For each concept (an unnamed shape in one colour: the model can draw it, no word names it) five renders
are the training images; one run of --steps writes a snapshot every --every steps, and each snapshot is
scored with the toy-world evaluator: fidelity ("a photo of a <tok>" is that shape and colour), similarity
(evaluator-feature cosine to the training images) and editability ("a <tok> on a {bg} background" has
that background). Wall time is the training time up to the snapshot (from metrics.jsonl).
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

DEFAULT_CONCEPTS = "red-crescent,cyan-crescent,orange-crescent,red-hexagram"


def concept_images(shape: str, color: str, folder: Path) -> Path:
    from dataclasses import replace

    from conceptor.toyworld import concept
    from conceptor.toyworld import world as W

    folder.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(concept.concept_specs()):  # the demo's five poses and backgrounds
        W.render(replace(spec, shape=shape, color=color)).save(folder / f"{i}.png")
    return folder


def run_concept(shape: str, color: str, work: Path, steps: int, every: int, lr: float, batch: int,
                n_eval: int, guidance: float | None = None) -> list[dict]:
    from conceptor import api
    from conceptor.config import build_config
    from conceptor.eval.concept import evaluate
    from conceptor.toyworld.concept import TEMPLATES
    from conceptor.toyworld.evaluator import load_evaluator
    from conceptor.training.metrics import read_metrics

    images = concept_images(shape, color, work / f"{color}-{shape}-images")
    out = work / f"{color}-{shape}-run"
    cfg = build_config("textual-inversion", None, {
        "data": {"images": str(images)}, "optim": {"lr": lr},
        "train": {"output": str(out), "steps": steps, "batch_size": batch, "checkpoint_every": every,
                  "log_every": 1, "overwrite": True, "snr_gamma": 5.0},
        "textual_inversion": {"token": "<c>", "init_token": "object", "templates": str(TEMPLATES)}})
    api.train(cfg)
    elapsed = {r["step"]: r["elapsed_s"] for r in read_metrics(out / "metrics.jsonl")}
    evaluator = load_evaluator()
    from PIL import Image

    reference = [Image.open(p).convert("RGB") for p in sorted(images.glob("*.png"))]
    rows = []
    base = api.load(None)
    scores, _ = evaluate(base, evaluator, "object", reference, n=n_eval, identity=(shape, color),
                         guidance=guidance)
    rows.append({"concept": f"{color} {shape}", "step": 0, "train_s": 0.0, **_pick(scores)})
    for step in range(every, steps + 1, every):
        emb = out / f"learned_embeds-steps-{step}.safetensors"
        scores, _ = evaluate(api.load(None, [emb]), evaluator, "<c>", reference, n=n_eval, identity=(shape, color),
                             guidance=guidance)
        rows.append({"concept": f"{color} {shape}", "step": step, "train_s": elapsed.get(step), **_pick(scores)})
        print(_fmt(rows[-1]), flush=True)
    return rows


def _pick(scores: dict) -> dict:
    return {k: scores[k] for k in ("fidelity", "similarity", "editability")}


def _fmt(r: dict) -> str:
    return (f"| {r['concept']} | {r['step']} | {r['train_s']} | {r['fidelity']:.2f} | {r['similarity']:.3f} | "
            f"{r['editability']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-images", type=int, default=16)
    ap.add_argument("--concepts", default=DEFAULT_CONCEPTS, help="comma-separated colour-shape pairs")
    ap.add_argument("--guidance", type=float, default=None, help="sampling guidance (default: the model's)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = []
    print("| concept | step | train s | fidelity | similarity | editability |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.concepts.split(","):
            color, shape = item.split("-")
            rows += run_concept(shape, color, Path(tmp), args.steps, args.every, args.lr, args.batch_size,
                                args.eval_images, args.guidance)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; total {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

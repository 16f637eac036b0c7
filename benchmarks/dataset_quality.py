"""What a dataset config buys on the toy world: two concepts in one run, and masks against a shared background.

    python benchmarks/dataset_quality.py [--steps 400] [--eval-images 16] [--parts two,masks] [--json out.json]

(a) two concepts: the red arrow ("sks object") and the green crescent ("zwx object"), each five renders on
    varied backgrounds; each trained alone for --steps, then both in one run from one dataset config (two
    subsets, one class_tokens each, and the class images as a regularisation subset) for 2 x --steps, so each
    concept sees as many examples as alone. Scores per token: fidelity, similarity, editability.
(b) masks: five renders of the red arrow that all share one background (beige, dotted); without masks the
    token learns the background with the shape, and edits ("a sks object on a black background") keep it;
    with NAME_mask.png sidecars (the shape's own silhouette, from world.py) and mask_weight 0 the loss only
    sees the shape. Same steps, same lr.

DreamBooth LoRA r8 on attention, prior preservation with 50 class images of "a photo of a object", lr 1.5e-3,
batch 2 (+2 class): the setting docs/benchmarks.md found best for the arrow on this model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLASS = "a photo of a object"
CONCEPTS = {"sks object": ("arrow", "red"), "zwx object": ("crescent", "green")}
SHARED_BACKGROUND = ("beige", "dotted")


def render_concept(folder: Path, shape: str, color: str, background: tuple[str, str] | None = None,
                   masks: bool = False, erode: int = 0) -> Path:
    """Five renders (the demo concept's poses); one background for all when ``background`` is given."""
    from PIL import Image

    from conceptor.toyworld import concept
    from conceptor.toyworld import world as W

    folder.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(concept.concept_specs()):
        spec = replace(spec, shape=shape, color=color)
        if background:
            spec = replace(spec, background=background[0], pattern=background[1])
        W.render(spec).save(folder / f"{i}.png")
        if masks:  # the silhouette world.py paints the shape through, at the image's size
            big = W.SIZE * W._SS
            mask = W._mask(spec, big).resize((W.SIZE, W.SIZE), Image.BOX)
            if erode:  # a tighter mask, as drawn inside the outline
                from PIL import ImageFilter

                mask = mask.filter(ImageFilter.MinFilter(2 * erode + 1))
            mask.save(folder / f"{i}_mask.png")
    return folder


def dataset_toml(path: Path, subsets: list[dict]) -> Path:
    lines = ["[[datasets]]"]
    for sub in subsets:
        lines.append("  [[datasets.subsets]]")
        for k, v in sub.items():
            lines.append(f"  {k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def train(work: Path, name: str, data: dict, steps: int, lr: float, args, mask_weight: float | None = None,
          batch_size: int = 2, method: str = "dreambooth") -> float:
    from conceptor import api
    from conceptor.config import build_config

    if method == "dreambooth":
        section = {"lora": True, "rank": 8, "class_prompt": CLASS, "class_images": str(work / "class"),
                   "num_class_images": 50, "lora_text_encoder": args.lora_text_encoder}
    else:  # textual inversion: the token comes from the dataset config
        from conceptor.toyworld.concept import TEMPLATES

        section = {"templates": str(TEMPLATES)}
    cfg = build_config(method, None, {
        "model": {"model": args.model}, "data": {**data, **({"mask_weight": mask_weight} if mask_weight is not None
                                                              else {})},
        "optim": {"lr": lr, **({"lr_scheduler": "cosine"} if method != "dreambooth" else {})},
        "train": {"output": str(work / name), "steps": steps, "batch_size": batch_size,
                  "checkpoint_every": 0, "log_every": 50, "overwrite": True, "seed": args.seed,
                  **({"snr_gamma": 5.0} if method != "dreambooth" else {})},
        method.replace("-", "_"): section})
    t0 = time.time()
    api.train(cfg)
    return round(time.time() - t0, 1)


def scores(work: Path, run: str, subject: str, reference: Path, n: int, args, identity=None) -> dict:
    from conceptor import api
    from conceptor.data.dataset import concept_images
    from conceptor.data.images import load_image
    from conceptor.eval.concept import evaluate
    from conceptor.toyworld.evaluator import load_evaluator

    lora = work / run / "pytorch_lora_weights.safetensors"
    model = api.load(args.model, loras=[str(lora)]) if lora.is_file() else api.load(args.model, [str(work / run)])
    refs = [load_image(p) for p in concept_images(reference)]  # not the masks beside them
    s, _ = evaluate(model, load_evaluator(), subject, refs, n=n, identity=identity or CONCEPTS[subject])
    return {k: s[k] for k in ("fidelity", "similarity", "editability")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--eval-images", type=int, default=16)
    ap.add_argument("--parts", default="two,masks", help="two, masks (DreamBooth LoRA), masks-ti (textual inversion "
                    "of the red crescent, the demo's concept)")
    ap.add_argument("--together-batch", type=int, default=4, help="batch of the two-concept run (alone: 2), at the "
                    "same steps: each concept sees as many examples as alone")
    ap.add_argument("--ti-steps", type=int, default=300)
    ap.add_argument("--ti-lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--erode", type=int, default=0, help="masks: shrink the silhouette by this many pixels")
    ap.add_argument("--ti-shape", default="crescent", choices=("crescent", "hexagram"),
                    help="masks-ti: the unnamed shape textual inversion learns (red)")
    ap.add_argument("--skip-alone", action="store_true")
    ap.add_argument("--skip-nomask", action="store_true")
    ap.add_argument("--lora-text-encoder", action="store_true", help="DreamBooth: a LoRA of the text encoder too "
                    "(the toy CLIP encodes 'sks object' and 'zwx object' at cosine 0.985: the UNet alone can "
                    "hardly tell the triggers apart)")
    ap.add_argument("--model", default=None, help="model folder (default: the bundled toy UNet model)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp())
    parts = set(args.parts.split(","))
    rows = []

    def report(row):
        rows.append(row)
        print(f"| {row['part']} | {row['run']} | {row['subject']} | {row['steps']} | {row['train_s']} | "
              f"{row['fidelity']:.2f} | {row['similarity']:.3f} | {row['editability']:.2f} |", flush=True)

    print("| part | run | token | steps | train s | fidelity | similarity | editability |")
    print("|---|---|---|---|---|---|---|---|")
    if "two" in parts:
        folders = {s: render_concept(work / s.split()[0], *CONCEPTS[s]) for s in CONCEPTS}
        for subject, folder in folders.items():
            if args.skip_alone:
                break
            run = f"alone-{subject.split()[0]}"
            path = dataset_toml(work / f"{run}.toml", [{"image_dir": str(folder), "class_tokens": subject,
                                                        "num_repeats": 100}])
            t = train(work, run, {"dataset": str(path)}, args.steps, args.lr, args)
            report({"part": "two concepts", "run": "alone", "subject": subject, "steps": args.steps, "train_s": t,
                    **scores(work, run, subject, folder, args.eval_images, args)})
        path = dataset_toml(work / "together.toml", [{"image_dir": str(f), "class_tokens": s, "num_repeats": 100}
                                                     for s, f in folders.items()])
        t = train(work, "together", {"dataset": str(path)}, args.steps, args.lr, args, batch_size=args.together_batch)
        for subject, folder in folders.items():
            report({"part": "two concepts", "run": f"one run, both, batch {args.together_batch}", "subject": subject,
                    "steps": args.steps,
                    "train_s": t, **scores(work, "together", subject, folder, args.eval_images, args)})
    if "two-ti" in parts:  # textual inversion: two tokens, each its own vectors, in one run
        ti = {"<c>": ("crescent", "red"), "<h>": ("hexagram", "cyan")}
        folders = {t: render_concept(work / f"ti-{shape}", shape, color) for t, (shape, color) in ti.items()}
        subsets = {t: {"image_dir": str(f), "token": t, "init_token": "object", "num_repeats": 100}
                   for t, f in folders.items()}
        runs = [] if args.skip_alone else [(f"ti-alone-{ti[t][0]}", [t], 8) for t in ti]
        for name, tokens, batch in runs + [("ti-together", list(ti), 16)]:
            path = dataset_toml(work / f"{name}.toml", [subsets[t] for t in tokens])
            t = train(work, name, {"dataset": str(path)}, args.ti_steps, args.ti_lr, args, batch_size=batch,
                      method="textual-inversion")
            for token in tokens:
                report({"part": "TI, two concepts", "run": f"{'alone' if len(tokens) == 1 else 'one run, both'}, "
                        f"batch {batch}", "subject": token, "steps": args.ti_steps, "train_s": t,
                        **scores(work, name, token, folders[token], args.eval_images, args, identity=ti[token])})
    if "masks-ti" in parts:  # textual inversion of the demo's red crescent, all on one background
        folder = render_concept(work / "shared-bg-ti", args.ti_shape, "red", background=SHARED_BACKGROUND,
                                masks=True, erode=args.erode)
        for run, masks in (("no masks", False), ("masks", True))[1 if args.skip_nomask else 0:]:
            name = "ti-" + run.replace(" ", "-")
            path = dataset_toml(work / f"{name}.toml", [{"image_dir": str(folder), "token": "<c>",
                                                         "init_token": "object", "num_repeats": 100, "masks": masks}])
            t = train(work, name, {"dataset": str(path)}, args.ti_steps, args.ti_lr, args, mask_weight=0.0,
                      batch_size=8, method="textual-inversion")
            report({"part": f"TI, one background ({' '.join(SHARED_BACKGROUND)})", "run": run, "subject": "<c>",
                    "steps": args.ti_steps, "train_s": t,
                    **scores(work, name, "<c>", folder, args.eval_images, args, identity=(args.ti_shape, "red"))})
    if "masks" in parts:
        subject = "sks object"
        folder = render_concept(work / "shared-bg", *CONCEPTS[subject], background=SHARED_BACKGROUND, masks=True)
        for run, masks in (("no masks", False), ("masks", True)):
            name = run.replace(" ", "-")
            path = dataset_toml(work / f"{name}.toml", [{"image_dir": str(folder), "class_tokens": subject,
                                                         "num_repeats": 100, "masks": masks}])
            t = train(work, name, {"dataset": str(path)}, args.steps, args.lr, args, mask_weight=0.0)
            report({"part": f"one background ({' '.join(SHARED_BACKGROUND)})", "run": run, "subject": subject,
                    "steps": args.steps, "train_s": t,
                    **scores(work, name, subject, folder, args.eval_images, args)})
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.eval_images} images per score; work folder {work}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

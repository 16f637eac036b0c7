"""Learning curves on the toy world: how fast each method learns a concept, conceptor against diffusers' scripts.

    python benchmarks/curves.py [--methods textual-inversion,dreambooth,pivotal] [--sources conceptor,diffusers]
        [--concepts red-crescent,...] [--seeds 0,1,2] [--steps 300] [--every 25] [--eval-images 8]
        [--set KEY=VALUE ...] [--json F] [--plots DIR]

For every method x concept x seed, one training run writes a snapshot every --every steps, and each snapshot is
scored with the toy-world evaluator, the same way for both sources: fidelity ("a photo of a SUBJECT" is that shape
and colour), editability ("a SUBJECT on a BG background" has that background) and, for DreamBooth and pivotal
tuning, class-prior retention ("a photo of a object" is not the subject) at 100, 150 and the last step.

Sources: ``conceptor`` = `conceptor train METHOD` with its defaults and only the inputs every run needs (token,
init word, images, prompts, seed, steps, snapshots); `--set section.key=value` changes a default (the levers of
issue 25 are measured this way). ``diffusers`` = diffusers' own example script (textual_inversion.py,
train_dreambooth_lora.py), byte for byte from a mirror, run on the same model, images and prompts, with
conceptor's values for the flags the script has (lr, batch, resolution, schedule, rank, seed, prior weight) and the
script's defaults for the rest (benchmarks/diffusers_scripts.py). Pivotal tuning has no plain diffusers script
for SD 1.x (the advanced script is SDXL's), so it is conceptor only.

Concepts (six, hard in different ways): the unnamed crescent and hexagram (drawn in pretraining, never named) in
an easy colour and in one the model confuses (blue -> cyan, purple -> pink), and the never-drawn arrow in two
colours. Output: per method and source, the steps to reach fidelity 0.8 (first snapshot at or above it; mean over
the runs that reach it, and how many never do) and the mean fidelity at 100/150/300 steps; one PNG plot per method.
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

DEFAULT_CONCEPTS = "red-crescent,blue-crescent,red-hexagram,purple-hexagram,red-arrow,green-arrow"
TOKEN, INIT = "<c>", "object"
INSTANCE = "a photo of a sks object"
CLASS = "a photo of a object"
NUM_CLASS = 50
TABLE_STEPS = (100, 150, 300)


def concept_images(concept: str, work: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import concept_images as render

    color, shape = concept.split("-")
    return render(shape, color, work / f"{concept}-images")


def _parse_sets(sets: list[str]) -> dict:
    out: dict = {}
    for item in sets:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a plain string
        out.setdefault(section, {})[name] = value
    return out


def conceptor_config(method: str, images: Path, out: Path, steps: int, every: int, seed: int, work: Path,
                     model: str | None, sets: dict) -> dict:
    """The run as a user types it: the method's defaults, the inputs every run needs, snapshots every ``every``."""
    train = {"output": str(out), "steps": steps, "checkpoint_every": every, "log_every": every, "overwrite": True,
             "seed": seed}
    prior = {"class_prompt": CLASS, "class_images": str(work / "class"), "num_class_images": NUM_CLASS}
    cfg = {"model": {"model": model}, "data": {"images": str(images)}, "train": train}
    if method == "textual-inversion":
        cfg["textual_inversion"] = {"token": TOKEN, "init_token": INIT}
    elif method == "dreambooth":
        cfg["lora"] = {"enabled": True}
        cfg["dreambooth"] = {"instance_prompt": INSTANCE, **prior}
    else:
        cfg["pivotal"] = {"token": TOKEN, "init_token": INIT, "instance_prompt": f"a photo of a {TOKEN} object",
                          **prior}
    for section, values in sets.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def run_conceptor(method: str, images: Path, out: Path, steps: int, every: int, seed: int, work: Path,
                  model: str | None, sets: dict) -> tuple[list[tuple[int, Path]], dict]:
    """Train; returns ([(step, snapshot file)], the resolved config)."""
    from conceptor import api
    from conceptor.config import build_config

    cfg = build_config(method, conceptor_config(method, images, out, steps, every, seed, work, model, sets), {})
    api.train(cfg)
    stem = {"textual-inversion": "learned_embeds", "dreambooth": "pytorch_lora_weights", "pivotal": "c"}[method]
    snaps = [(s, out / f"{stem}-steps-{s}.safetensors") for s in range(every, steps, every)]
    snaps.append((steps, out / f"{stem}.safetensors"))
    return [(s, p) for s, p in snaps if p.is_file()], cfg.to_dict()


def run_diffusers(method: str, images: Path, out: Path, steps: int, every: int, seed: int, work: Path,
                  model: str, resolved: dict) -> list[tuple[int, Path]]:
    """diffusers' script with conceptor's values where the script has the flag (``resolved``: conceptor's config
    for the same run)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import diffusers_scripts as D

    optim, train, data = resolved["optim"], resolved["train"], resolved["data"]
    adamw = optim.get("optimizer", "adamw") == "adamw"
    common = {"steps": steps, "seed": seed, "lr": optim["lr"] if adamw else None, "batch_size": train["batch_size"],
              "resolution": data["resolution"] or 64, "save_every": every, "lr_scheduler": optim["lr_scheduler"],
              "warmup": optim["warmup"]}
    if method == "textual-inversion":
        return D.run_textual_inversion(model, images, out, token=TOKEN, init_token=INIT, **common)
    if method == "dreambooth":
        return D.run_dreambooth_lora(model, images, out, instance_prompt=INSTANCE, class_prompt=CLASS,
                                     class_dir=work / "class", num_class_images=NUM_CLASS,
                                     rank=resolved["lora"]["rank"], **common)
    raise ValueError(f"no diffusers script for {method}")


def subject(method: str) -> str:
    return {"textual-inversion": TOKEN, "dreambooth": "sks object", "pivotal": f"{TOKEN} object"}[method]


def score_snapshots(method: str, snaps: list[tuple[int, Path]], model: str | None, references, identity,
                    n: int, prior_at: tuple[int, ...]) -> list[dict]:
    from conceptor import api
    from conceptor.eval.concept import evaluate, prior_retention
    from conceptor.toyworld.evaluator import load_evaluator

    evaluator = load_evaluator()
    rows = []
    for step, path in snaps:
        if method == "textual-inversion":
            m = api.load(model, [path])
        else:  # a LoRA file, or pivotal's bundle (its embeddings load with it)
            m = api.load(model, loras=[path])
        scores, _ = evaluate(m, evaluator, subject(method), references, n=n, identity=identity)
        row = {"step": step, "fidelity": scores["fidelity"], "editability": scores["editability"],
               "similarity": scores["similarity"]}
        if method != "textual-inversion" and (step in prior_at or step == snaps[-1][0]):
            row["prior_retention"], _ = prior_retention(m, evaluator, CLASS, identity[0], n=n)
        rows.append(row)
    return rows


def base_prior(model: str | None, shape: str, n: int) -> float:
    """Prior retention of the untrained model for this shape: the toy "object" class is mostly crescents
    (the untrained model draws one for about half of "a photo of a object"), so a crescent concept starts low."""
    from conceptor import api
    from conceptor.eval.concept import prior_retention
    from conceptor.toyworld.evaluator import load_evaluator

    return prior_retention(api.load(model), load_evaluator(), CLASS, shape, n=n)[0]


def at(curve: list[dict], step: int, key: str):
    return next((p[key] for p in curve if p["step"] == step and key in p), None)


def steps_to(curve: list[dict], target: float) -> int | None:
    return next((r["step"] for r in curve if r["fidelity"] >= target), None)


def summarise(runs: list[dict], target: float = 0.8, goal_step: int = 150) -> list[str]:
    """One row per method and source. Prior retention is given as measured and relative to the untrained
    model's (``base_prior``: 1.0 = drew the subject for the class prompt no more often than before training)."""
    lines = ["| method | source | runs | steps to fidelity 0.8 (mean of runs reaching it; never) | fidelity at "
             + " / ".join(map(str, TABLE_STEPS)) + f" | editability at {goal_step} / last | prior retention at "
             f"{goal_step} / last (relative to the untrained model) |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["method"], r["source"]) for r in runs})
    for method, source in keys:
        rs = [r for r in runs if r["method"] == method and r["source"] == source]
        reached = [s for s in (steps_to(r["curve"], target) for r in rs) if s is not None]
        never = len(rs) - len(reached)
        fid = []
        for step in TABLE_STEPS:
            vals = [v for r in rs if (v := at(r["curve"], step, "fidelity")) is not None]
            fid.append(f"{statistics.mean(vals):.2f}" if vals else "-")
        edit = [statistics.mean(v for r in rs if (v := at(r["curve"], step, "editability")) is not None)
                if any(at(r["curve"], step, "editability") is not None for r in rs) else None
                for step in (goal_step, rs[0]["curve"][-1]["step"])]
        prior = []
        for step in (goal_step, None):
            pairs = [(v, r.get("base_prior")) for r in rs
                     if (v := at(r["curve"], step if step else r["curve"][-1]["step"], "prior_retention")) is not None]
            if pairs:
                rel = [min(1.0, v / b) if b else 1.0 for v, b in pairs if b is not None]
                prior.append(f"{statistics.mean(v for v, _ in pairs):.2f}"
                             + (f" ({statistics.mean(rel):.2f})" if rel else ""))
        lines.append(f"| {method} | {source} | {len(rs)} | "
                     f"{f'{statistics.mean(reached):.0f}' if reached else '-'} ({never} never) | {' / '.join(fid)} | "
                     + " / ".join(f"{e:.2f}" if e is not None else "-" for e in edit) + " | "
                     + (" / ".join(prior) if prior else "-") + " |")
    return lines


def plot(runs: list[dict], method: str, path: Path, size=(640, 360)) -> None:
    """Mean fidelity against steps, one line per source (thin lines: each run), in PIL (no matplotlib here)."""
    from PIL import Image, ImageDraw

    colors = {"conceptor": (40, 90, 200), "diffusers": (220, 110, 30)}
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 50, 20, size[0] - 120, size[1] - 40
    rs = [r for r in runs if r["method"] == method]
    max_step = max(p["step"] for r in rs for p in r["curve"])

    def xy(step, value):
        return left + (right - left) * step / max_step, bottom - (bottom - top) * value

    d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    for v in (0.0, 0.5, 0.8, 1.0):
        y = xy(0, v)[1]
        d.line([left, y, right, y], fill=(225, 225, 225))
        d.text((8, y - 6), f"{v:.1f}", fill="black")
    for s in range(0, max_step + 1, 50):
        x = xy(s, 0)[0]
        d.text((x - 8, bottom + 6), str(s), fill="black")
    for k, source in enumerate(sorted({r["source"] for r in rs})):
        color = colors.get(source, (80, 160, 80))
        light = tuple(int(c + (255 - c) * 0.7) for c in color)
        curves = [r["curve"] for r in rs if r["source"] == source]
        for c in curves:
            d.line([xy(p["step"], p["fidelity"]) for p in c], fill=light, width=1)
        steps = sorted({p["step"] for c in curves for p in c})
        mean = [(s, statistics.mean(p["fidelity"] for c in curves for p in c if p["step"] == s)) for s in steps]
        d.line([xy(s, v) for s, v in mean], fill=color, width=3)
        d.text((right + 10, top + 20 * k), f"{source} ({len(curves)})", fill=color)
    d.text((left, 2), f"{method}: fidelity against training steps (toy world)", fill="black")
    d.text((right - 40, bottom + 22), "steps", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="textual-inversion,dreambooth,pivotal")
    ap.add_argument("--sources", default="conceptor,diffusers")
    ap.add_argument("--concepts", default=DEFAULT_CONCEPTS)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--eval-images", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="change a conceptor default for every conceptor run (a lever), e.g. optim.lr=5e-3")
    ap.add_argument("--model", default=None, help="model folder (default: the bundled toy UNet model)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plots", default=None, help="folder for one curves-METHOD.png per method")
    args = ap.parse_args()
    import torch
    from PIL import Image

    from conceptor.api import bundled_model_path

    model_dir = args.model or str(bundled_model_path())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp())
    sets = _parse_sets(args.set)
    runs = []
    t0 = time.time()
    for concept in args.concepts.split(","):
        images = concept_images(concept, work)
        references = [Image.open(p).convert("RGB") for p in sorted(images.glob("*.png"))]
        color, shape = concept.split("-")
        prior0 = None
        if any(m != "textual-inversion" for m in args.methods.split(",")):
            prior0 = base_prior(args.model, shape, args.eval_images)
        for method in args.methods.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                resolved = None
                for source in args.sources.split(","):
                    if source == "diffusers" and method == "pivotal":
                        continue
                    out = work / f"{concept}-{method}-{source}-{seed}"
                    t1 = time.time()
                    if source == "conceptor":
                        snaps, resolved = run_conceptor(method, images, out, args.steps, args.every, seed, work,
                                                        args.model, sets)
                    else:
                        if resolved is None:  # conceptor's values for the script's flags, without training
                            from conceptor.config import build_config

                            plain = conceptor_config(method, images, out, args.steps, args.every, seed, work,
                                                     args.model, sets)
                            resolved = build_config(method, plain, {}).to_dict()
                        snaps = run_diffusers(method, images, out, args.steps, args.every, seed, work, model_dir,
                                              resolved)
                    train_s = time.time() - t1
                    curve = score_snapshots(method, snaps, args.model, references, (shape, color),
                                            args.eval_images, TABLE_STEPS)
                    run = {"concept": concept, "method": method, "source": source, "seed": seed,
                           "train_s": round(train_s, 1), "curve": curve}
                    if method != "textual-inversion":
                        run["base_prior"] = prior0
                    runs.append(run)
                    points = " ".join(f"{p['step']}:{p['fidelity']:.2f}" for p in curve)
                    print(f"{concept} {method} {source} seed {seed} ({train_s:.0f} s): {points}", flush=True)
                    if args.json:  # after every run: a long sweep stopped midway keeps what it measured
                        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    print()
    print("\n".join(summarise(runs)))
    if args.plots:
        for method in sorted({r["method"] for r in runs}):
            plot(runs, method, Path(args.plots) / f"curves-{method}.png")
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{time.time() - t0:.0f} s; work folder {work}")


if __name__ == "__main__":
    main()

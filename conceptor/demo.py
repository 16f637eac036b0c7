"""The demo: a sample concept, "before" images, textual inversion, "after" images, a report.

On the bundled toy-world model (conceptor/toyworld/) the report holds real numbers from the toy-world
evaluator: fidelity before/after, similarity and editability. Without it (an install that lacks the
bundled weights) the demo builds a tiny random-weight model in code: that shows every stage runs end to
end, not that a concept is learned, and the report says so.
"""
from __future__ import annotations

import html
import json
import logging
import shutil
import time
from pathlib import Path

from PIL import Image, ImageDraw

from .api import bundled_model_path
from .config import build_config
from .errors import ConceptorError
from .fileio import atomic_path, write_text
from .training.manifest import MANIFEST, Manifest

log = logging.getLogger("conceptor")
TOKEN = "<concept>"
INIT = "object"


def _tiny_concept(folder: Path, n: int = 5) -> Path:
    """Five pictures of one yellow disc on blue (the stand-in concept for the random-weight model)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (64, 64), (40, 70, 200))
        ImageDraw.Draw(im).ellipse([12 + 3 * i, 14, 48 + i, 50 - i], fill=(245, 205, 30))
        im.save(folder / f"{i}.png")
    return folder


def _prepare(output: str | Path, overwrite: bool) -> Path:
    """The demo folder, emptied of an earlier demo's own files (its manifest's, and its run's), never of
    anything else: a folder without conceptor's list of what it wrote is refused, not deleted."""
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConceptorError(f"{out} already holds a demo; pass --overwrite or another --output")
        manifest = Manifest.read(out)
        if manifest is None:
            raise ConceptorError(f"{out} is not a demo folder conceptor listed (no {MANIFEST}); refusing to delete "
                                 "anything in it: choose another --output")
        run = Manifest.read(out / "run")
        if run is not None:
            run.remove_all()
        manifest.remove_all()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _save_grid(images: list[Image.Image], path: Path, cols: int) -> None:
    from .sampling.grid import make_grid

    with atomic_path(path) as tmp:
        make_grid(images, cols).save(tmp, format="PNG")


def run_demo(output: str | Path, steps: int | None = None, overwrite: bool = False) -> dict:
    from . import api
    from .eval.concept import has_toyworld_evaluator

    out = _prepare(output, overwrite)
    t0 = time.perf_counter()
    model = bundled_model_path()
    toy = model is not None and has_toyworld_evaluator()
    if toy:
        from .toyworld.concept import FOLDER

        images = out / "concept"  # a copy, so the report folder is self-contained
        shutil.copytree(FOLDER, images, dirs_exist_ok=True)
        from .toyworld.concept import TEMPLATES

        steps = steps or 300
        # min-SNR weighting: the toy UNet's loss at low noise ignores the text, so those steps only add noise
        # to the token's gradient; prompts in the toy vocabulary (the seeds' templates have unknown words).
        # Batch 8: at batch 4 the token's gradient is too noisy to settle on the colour (measured: fidelity
        # 0.0 at batch 4 vs 1.0 at batch 8 for 300 steps; 200-400 steps all give 1.0 at batch 8).
        train = {"batch_size": 8, "validation_images": 4, "snr_gamma": 5.0}
        optim = {"lr": 5e-3, "lr_scheduler": "cosine"}  # the decay lets the token settle instead of wander
        templates = str(TEMPLATES)
        note = None
    else:
        from .models.tiny import build_tiny_pipeline_folder

        note = ("tiny random-weight model built in code (the bundled pretrained toy model is not in this "
                "install): this shows every stage runs and the loss falls, not that a concept is learned")
        log.warning("demo: %s", note)
        model = build_tiny_pipeline_folder(out / "tiny-model", "sd1", words=("a", "photo", "of", INIT))
        images = _tiny_concept(out / "concept")
        steps = steps or 150
        train = {"batch_size": 4, "validation_images": 4}
        optim = {"lr": 5e-3}
        templates = None
    cfg = build_config("textual-inversion", None, {
        "model": {"model": str(model)},
        "data": {"images": str(images)},
        "optim": optim,
        "train": {"output": str(out / "run"), "steps": steps, "checkpoint_every": 0,
                  "validation_prompts": [f"a photo of a {TOKEN}"], "validation_every": max(1, steps // 4),
                  "log_every": 5, **train},
        "textual_inversion": {"token": TOKEN, "init_token": INIT, "templates": templates},
    })
    base = api.load(str(model))
    result = api.train(cfg)
    trained = api.load(str(model), [result.output / "learned_embeds.safetensors"])
    from .training.metrics import read_metrics

    rows = read_metrics(result.output / "metrics.jsonl")
    summary: dict = {"model": "bundled toy-world model" if toy else "tiny random-weight model (code)",
                     "steps": cfg.train.steps, "loss_first": round(rows[0]["loss"], 4),
                     "loss_last": round(rows[-1]["loss"], 4)}
    if toy:
        from .eval.concept import evaluate
        from .toyworld.concept import COLOR, SHAPE
        from .toyworld.evaluator import load_evaluator

        evaluator = load_evaluator()
        reference = [Image.open(p).convert("RGB") for p in sorted(Path(images).glob("*.png"))]
        # Before training the token *is* its initializer, so "a photo of a object" is the before picture.
        before, before_sets = evaluate(base, evaluator, INIT, reference, identity=(SHAPE, COLOR))
        after, after_sets = evaluate(trained, evaluator, TOKEN, reference, identity=(SHAPE, COLOR))
        summary.update({"concept": f"{COLOR} {SHAPE}, learned from the word {INIT!r}",
                        "concept_fidelity_before": before["fidelity"], "concept_fidelity_after": after["fidelity"],
                        "similarity_before": before["similarity"], "similarity_after": after["similarity"],
                        "editability_after": after["editability"]})
        _save_grid(before_sets["photos"][:8], out / "before.png", 8)
        _save_grid(after_sets["photos"][:8], out / "after.png", 8)
        _save_grid(after_sets["edits"], out / "edits.png", len(after_sets["edits"]) // 4)
    else:
        _save_grid(base.generate(f"a photo of a {INIT}", num_images=4), out / "before.png", 4)
        _save_grid(trained.generate(f"a photo of a {TOKEN}", num_images=4), out / "after.png", 4)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    report = {"summary": summary, "note": note, "wall_seconds": summary["wall_seconds"],
              "embedding": str(result.output / "learned_embeds.safetensors"), "report_html": str(out / "report.html"),
              **{k: v for k, v in summary.items() if k.startswith(("concept_", "similarity_", "editability_"))}}
    write_text(out / "report.json", json.dumps(report, indent=2))
    write_text(out / "report.html", _html(report, result.output, toy))
    # What the demo wrote beside its run (which keeps its own list), so --overwrite removes exactly that.
    Manifest(out).add(*(out / name for name in ("concept", "tiny-model", "before.png", "after.png", "edits.png",
                                                "report.json", "report.html")))
    return report


def _html(report: dict, run: Path, toy: bool) -> str:
    samples = sorted((run / "samples").glob("step-*.png"))
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in report["summary"].items())
    grids = "".join(f"<figure><img src='run/samples/{p.name}'><figcaption>{p.stem}</figcaption></figure>"
                    for p in samples)
    note = f"<p><b>Note:</b> {html.escape(report['note'])}</p>" if report["note"] else ""
    edits = ("<h2>Editability: \"a &lt;concept&gt; on a {white, gray, black, beige} background\"</h2>"
             "<img src='edits.png'>") if toy else ""
    return (f"<!doctype html><meta charset=utf-8><title>conceptor demo</title>"
            f"<style>img{{image-rendering:pixelated;height:128px}}figure{{display:inline-block}}</style>"
            f"<h1>conceptor demo: textual inversion</h1>{note}<h2>Training images</h2>"
            + "".join(f"<img src='concept/{p.name}'>" for p in sorted((run.parent / "concept").glob("*.png")))
            + f"<table>{rows}</table>"
            f"<h2>Before (\"a photo of a {INIT}\", the token's starting point)</h2><img src='before.png'>"
            f"<h2>After (\"a photo of a {html.escape(TOKEN)}\")</h2><img src='after.png'>{edits}"
            f"<h2>Loss</h2><img src='run/loss.png'><h2>Validation over training</h2>{grids}")

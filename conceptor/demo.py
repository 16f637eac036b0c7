"""The demo: a sample concept, "before" images, textual inversion, "after" images, a report.

Until the bundled toy-world model exists in this install, the demo builds a tiny random-weight
SD-shaped model in code: it shows every stage runs end to end and the loss falls, not that a concept is
learned (random weights cannot draw anything). It says so in its output.
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

log = logging.getLogger("conceptor")
TOKEN = "<concept>"
PROMPT = f"a photo of a {TOKEN}"


def _sample_images(folder: Path, n: int = 5) -> Path:
    """Five pictures of one yellow disc on blue with small jitter (the tiny-model stand-in concept)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (64, 64), (40, 70, 200))
        d = ImageDraw.Draw(im)
        o = 3 * i
        d.ellipse([12 + o, 14, 48 + o // 2, 50 - o // 3], fill=(245, 205, 30))
        im.save(folder / f"{i}.png")
    return folder


def run_demo(output: str | Path, steps: int | None = None, overwrite: bool = False) -> dict:
    from . import api
    from .models.tiny import build_tiny_pipeline_folder
    from .sampling.grid import make_grid
    from .training.metrics import read_metrics

    out = Path(output)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConceptorError(f"{out} already holds a demo; pass --overwrite or another --output")
        if not (out / "report.json").exists() and not (out / "run").exists():
            raise ConceptorError(f"{out} is not a conceptor demo folder; refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    model = bundled_model_path()
    note = None
    if model is None:
        note = ("tiny random-weight model built in code (the bundled pretrained toy model is not in this "
                "install): this shows every stage runs and the loss falls, not that a concept is learned")
        log.warning("demo: %s", note)
        model = build_tiny_pipeline_folder(out / "tiny-model", "sd1")
    images = _sample_images(out / "concept")
    seeds = list(range(4))

    cfg = build_config("textual-inversion", None, {
        "model": {"model": str(model)},
        "data": {"images": str(images), "flip_p": 0.5},
        "optim": {"lr": 5e-3},
        "train": {"output": str(out / "run"), "steps": steps or 150, "batch_size": 4, "checkpoint_every": 0,
                  "validation_prompts": [PROMPT], "validation_every": max(1, (steps or 150) // 3),
                  "validation_images": len(seeds), "log_every": 5},
        "textual_inversion": {"token": TOKEN, "init_token": "object" if note is None else "toy"},
    })

    before = api.load(str(model)).generate("a photo of a toy", num_images=len(seeds), seed=0)
    result = api.train(cfg)
    after = api.load(str(model), [result.output / "learned_embeds.safetensors"]).generate(
        PROMPT, num_images=len(seeds), seed=0)
    for name, imgs in (("before.png", before), ("after.png", after)):
        with atomic_path(out / name) as tmp:
            make_grid(imgs, len(seeds)).save(tmp, format="PNG")

    rows = read_metrics(result.output / "metrics.jsonl")
    first, last = rows[0]["loss"], rows[-1]["loss"]
    summary = {"model": "tiny random-weight (code)" if note else "bundled toy model",
               "steps": cfg.train.steps, "loss_first": round(first, 4), "loss_last": round(last, 4)}
    report = {"summary": summary, "note": note, "wall_seconds": round(time.perf_counter() - t0, 1),
              "embedding": str(result.output / "learned_embeds.safetensors"),
              "report_html": str(out / "report.html")}
    write_text(out / "report.json", json.dumps(report, indent=2))
    write_text(out / "report.html", _html(report, result.output))
    return report


def _html(report: dict, run: Path) -> str:
    samples = sorted((run / "samples").glob("step-*.png"))
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in report["summary"].items())
    grids = "".join(f"<figure><img src='run/samples/{p.name}'><figcaption>{p.stem}</figcaption></figure>"
                    for p in samples)
    note = f"<p><b>Note:</b> {html.escape(report['note'])}</p>" if report["note"] else ""
    return (f"<!doctype html><meta charset=utf-8><title>conceptor demo</title>"
            f"<style>img{{image-rendering:pixelated;width:512px}}figure{{display:inline-block}}</style>"
            f"<h1>conceptor demo: textual inversion</h1>{note}<table>{rows}</table>"
            f"<h2>Before (\"a photo of a toy\") and after (\"{html.escape(PROMPT)}\")</h2>"
            f"<img src='before.png'><br><img src='after.png'><h2>Loss</h2><img src='run/loss.png'>"
            f"<h2>Validation over training</h2>{grids}")

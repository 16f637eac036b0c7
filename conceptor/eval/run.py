"""Evaluate a run folder: reload its model, embedding and training images from its saved config."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import config_from_saved
from ..errors import ConceptorError
from ..fileio import atomic_path, write_text

log = logging.getLogger("conceptor")


def evaluate_run(run: str | Path, *, model: str | None = None, n: int = 16, steps: int = 25,
                 guidance: float = 7.5, seed: int = 0) -> dict:
    from .. import api
    from ..data.images import list_images, load_image
    from ..sampling.grid import make_grid
    from ..toyworld.evaluator import load_evaluator
    from .concept import evaluate, has_toyworld_evaluator

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ConceptorError(f"{run} is not a run folder (no config.yaml)")
    cfg = config_from_saved(run / "config.yaml") or {}
    if cfg.get("method") != "textual-inversion":
        raise ConceptorError(f"conceptor eval measures textual-inversion runs; {run} is {cfg.get('method')!r}")
    if not has_toyworld_evaluator():
        raise ConceptorError("the toy-world evaluator is not in this install; reinstall conceptor from its repo")
    embedding = run / "learned_embeds.safetensors"
    if not embedding.is_file():
        raise ConceptorError(f"{run} has no learned_embeds.safetensors yet; finish or resume the run first")
    token = cfg["textual_inversion"]["token"]
    model = model or cfg.get("model", {}).get("model")
    if model is None or Path(model).resolve() != Path(api.bundled_model_path() or "").resolve():
        log.warning("the toy-world evaluator only understands toy-world images; numbers for other models "
                    "are not meaningful")
    reference = [load_image(p) for p in list_images(cfg["data"]["images"])]
    scores, sets = evaluate(api.load(model, [embedding]), load_evaluator(), token, reference, n=n, seed=seed,
                            steps=steps, guidance=guidance)
    for name, images in sets.items():
        with atomic_path(run / f"eval-{name}.png") as tmp:
            make_grid(images, min(8, len(images))).save(tmp, format="PNG")
    write_text(run / "eval.json", json.dumps(scores, indent=2))
    return scores


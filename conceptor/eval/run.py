"""Evaluate a run folder: reload its model, embedding and training images from its saved config."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..config import config_from_saved
from ..errors import ConceptorError
from ..fileio import atomic_path, write_text

log = logging.getLogger("conceptor")


def subject_of(instance_prompt: str) -> str:
    """'a photo of a sks toy' -> 'sks toy': the phrase the fidelity/editability prompts are built around."""
    return re.sub(r"^(a|an)\s+(photo|picture|drawing|rendering)\s+of\s+(a|an|the)?\s*", "",
                  instance_prompt.strip(), flags=re.I) or instance_prompt


def evaluate_run(run: str | Path, *, model: str | None = None, n: int = 16, steps: int = 25,
                 guidance: float | None = None, seed: int = 0, class_prompt: str | None = None) -> dict:
    """Scores of a textual-inversion or DreamBooth (full or LoRA) run; writes eval.json and eval-*.png."""
    from .. import api
    from ..data.images import list_images, load_image
    from ..sampling.grid import make_grid
    from ..toyworld.evaluator import load_evaluator
    from .concept import evaluate, has_toyworld_evaluator, identify, prior_retention

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ConceptorError(f"{run} is not a run folder (no config.yaml)")
    cfg = config_from_saved(run / "config.yaml") or {}
    method = cfg.get("method")
    if method not in ("textual-inversion", "dreambooth"):
        raise ConceptorError(f"conceptor eval measures textual-inversion and dreambooth runs; {run} is {method!r}")
    if not has_toyworld_evaluator():
        raise ConceptorError("the toy-world evaluator is not in this install; reinstall conceptor from its repo")
    base = model or cfg.get("model", {}).get("model")
    if base is not None and Path(base).resolve() != Path(api.bundled_model_path() or "").resolve():
        log.warning("the toy-world evaluator only understands toy-world images; numbers for other models "
                    "are not meaningful")
    if method == "textual-inversion":
        embedding = run / "learned_embeds.safetensors"
        if not embedding.is_file():
            raise ConceptorError(f"{run} has no learned_embeds.safetensors yet; finish or resume the run first")
        loaded, subject = api.load(base, [embedding]), cfg["textual_inversion"]["token"]
    else:
        db = cfg["dreambooth"]
        subject = subject_of(db["instance_prompt"])
        class_prompt = class_prompt or db.get("class_prompt")
        if db.get("lora"):
            lora = run / "pytorch_lora_weights.safetensors"
            if not lora.is_file():
                raise ConceptorError(f"{run} has no pytorch_lora_weights.safetensors yet; finish or resume the run")
            loaded = api.load(base, loras=[lora])
        else:
            if not (run / "model_index.json").is_file():
                raise ConceptorError(f"{run} has no trained model yet (model_index.json); finish or resume the run")
            loaded = api.load(str(run))
    evaluator = load_evaluator()
    reference = [load_image(p) for p in list_images(cfg["data"]["images"])]
    identity = identify(evaluator, reference)
    scores, sets = evaluate(loaded, evaluator, subject, reference, n=n, seed=seed, steps=steps, guidance=guidance,
                            identity=identity)
    scores = {"method": method, "subject": subject, **scores}
    if method == "dreambooth" and class_prompt:
        scores["class_prompt"] = class_prompt
        scores["class_prior_retention"], sets["class"] = prior_retention(
            loaded, evaluator, class_prompt, identity[0], n=n, seed=seed, steps=steps, guidance=guidance)
    for name, images in sets.items():
        with atomic_path(run / f"eval-{name}.png") as tmp:
            make_grid(images, min(8, len(images))).save(tmp, format="PNG")
    write_text(run / "eval.json", json.dumps(scores, indent=2))
    return scores

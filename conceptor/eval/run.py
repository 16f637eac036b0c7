"""Evaluate a run folder: reload its model, embedding and training images from its saved config."""
from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

from ..config import build_config, config_from_saved
from ..errors import ConceptorError
from ..fileio import atomic_path, write_text
from ..methods import REGISTRY
from ..toyworld import FLUX_MODEL_FOLDER
from ..training.manifest import Manifest

log = logging.getLogger("conceptor")


def subject_of(instance_prompt: str) -> str:
    """'a photo of a sks toy' -> 'sks toy': the phrase the fidelity/editability prompts are built around."""
    return re.sub(r"^(a|an)\s+(photo|picture|drawing|rendering)\s+of\s+(a|an|the)?\s*", "",
                  instance_prompt.strip(), flags=re.I) or instance_prompt


def evaluate_run(run: str | Path, *, model: str | None = None, n: int = 16, steps: int = 25,
                 guidance: float | None = None, seed: int = 0, class_prompt: str | None = None) -> dict:
    """Scores of a textual-inversion, DreamBooth or fine-tuning run (full or LoRA); writes eval.json and
    eval-*.png grids."""
    from .. import api
    from ..data.images import load_image
    from ..toyworld.evaluator import load_evaluator
    from .concept import evaluate, has_toyworld_evaluator, identify, prior_retention

    run = Path(run)
    cfg = _saved_config(run)
    method = cfg["method"]
    if not has_toyworld_evaluator():
        raise ConceptorError("the toy-world evaluator is not in this install; reinstall conceptor from its repo")
    base = model or cfg.get("model", {}).get("model")
    toy_models = {Path(api.bundled_model_path() or "").resolve(), FLUX_MODEL_FOLDER.resolve()}
    if base is not None and Path(base).resolve() not in toy_models:
        log.warning("the toy-world evaluator only understands toy-world images; numbers for other models "
                    "are not meaningful")
    if method == "finetune":
        scores, sets = _finetune_scores(run, cfg, base, n=n, seed=seed, steps=steps, guidance=guidance)
        _write(run, scores, sets)
        return scores
    concepts = _concepts(cfg)
    if method == "textual-inversion":
        embeddings = sorted(run.glob("learned_embeds*.safetensors"))
        embeddings = [p for p in embeddings if "-steps-" not in p.name]
        if not embeddings:
            raise ConceptorError(f"{run} has no learned_embeds.safetensors yet; finish or resume the run first")
        loaded = api.load(base, embeddings)
    elif method == "pivotal":  # its LoRA and its tokens, as `conceptor generate --lora RUN` loads them
        class_prompt = class_prompt or cfg["pivotal"].get("class_prompt")
        loaded = _trained_model(run, base, True)
        for emb in sorted(run.glob("learned_embeds*.safetensors")):
            if "-steps-" not in emb.name:
                loaded.add_embedding(emb)
    else:
        class_prompt = class_prompt or cfg["dreambooth"].get("class_prompt")
        loaded = _trained_model(run, base, bool(cfg.get("lora", {}).get("enabled")))
    evaluator = load_evaluator()
    results, sets = [], {}
    for k, (subject, paths) in enumerate(concepts):
        reference = [load_image(p) for p in paths]
        identity = identify(evaluator, reference)
        scores, images = evaluate(loaded, evaluator, subject, reference, n=n, seed=seed, steps=steps,
                                  guidance=guidance, identity=identity)
        results.append({"subject": subject, **scores})
        sets.update({(name if k == 0 else f"{name}-{k + 1}"): v for name, v in images.items()})
    scores = {"method": method, **results[0]}
    if len(results) > 1:  # a dataset config with several concepts: each scored on its own subset's images
        scores["concepts"] = results
    if method in ("dreambooth", "pivotal") and class_prompt:
        scores["class_prompt"] = class_prompt
        scores["class_prior_retention"], sets["class"] = prior_retention(
            loaded, evaluator, class_prompt, identity_of(evaluator, concepts[0][1])[0], n=n, seed=seed, steps=steps,
            guidance=guidance)
    _write(run, scores, sets)
    return scores


def pivotal_subject(instance_prompt: str, token: str) -> str:
    """The phrase a pivotal run's prompts name its concept with: the instance prompt's subject, token filled in."""
    return subject_of(instance_prompt.replace("{}", token))


def cfg_section(method: str) -> str:
    return method.replace("-", "_")


def identity_of(evaluator, paths) -> tuple[str, str]:
    from ..data.images import load_image
    from .concept import identify

    return identify(evaluator, [load_image(p) for p in paths])


def _concepts(cfg: dict) -> list[tuple[str, list]]:
    """(subject, its training images) per concept: the flags' one, or each concept subset of a dataset."""
    from ..data.dataset import concept_images, load_training_set, read_training_set, shorthand

    d, method = cfg["data"], cfg["method"]
    tokens = method in ("textual-inversion", "pivotal")  # the subject is the new token
    own = cfg[cfg_section(method)].get("token") if tokens else subject_of(cfg["dreambooth"].get("instance_prompt")
                                                                          or "")
    if d.get("images"):
        if method == "pivotal" and cfg["pivotal"].get("instance_prompt"):  # "a photo of {} dog" -> "<tok> dog"
            own = pivotal_subject(cfg["pivotal"]["instance_prompt"], own)
        return [(own, concept_images(d["images"]))]
    ts = read_training_set(d["dataset"]) if str(d["dataset"]).lower().endswith(".toml") else \
        load_training_set([shorthand("--dataset", source=d["dataset"], image_column=d.get("image_column"),
                                     caption_column=d.get("caption_column"))], "--dataset", skip_bad=True)
    out = []
    for k, sub in enumerate(ts.subsets):
        if sub.is_reg:
            continue
        subject = (sub.token or own) if tokens else subject_of(sub.class_tokens or own)
        if method == "pivotal" and not sub.token and cfg["pivotal"].get("instance_prompt"):
            subject = pivotal_subject(cfg["pivotal"]["instance_prompt"], own)
        paths = [it.example.path for it in ts.items if it.subset == k and it.example.path is not None]
        if subject and paths and subject not in [s for s, _ in out]:
            out.append((subject, paths))
    if not out:
        raise ConceptorError(f"{d['dataset']} has no concept subset with images on disk to compare against")
    return out


def _saved_config(run: Path) -> dict:
    """The run's config.yaml, checked as a config file is (types, sections), with every section filled in."""
    path = run / "config.yaml"
    if not path.is_file():
        raise ConceptorError(f"{run} is not a run folder (no config.yaml)")
    raw = config_from_saved(path)
    method = raw.get("method")
    if method not in REGISTRY:
        raise ConceptorError(f"conceptor eval measures textual-inversion, dreambooth, pivotal and finetune runs; "
                             f"{path} names method {method!r}")
    try:
        return build_config(method, raw, {}).to_dict()
    except ConceptorError as e:
        raise ConceptorError(f"{path} is damaged or from another version: {e}") from None


def _trained_model(run: Path, base: str | None, lora: bool):
    """The run's output as an api.Model: base + its LoRA file, or the pipeline folder it wrote."""
    from .. import api

    if lora:
        path = run / "pytorch_lora_weights.safetensors"
        if not path.is_file():
            raise ConceptorError(f"{run} has no pytorch_lora_weights.safetensors yet; finish or resume the run")
        return api.load(base, loras=[path])
    if not (run / "model_index.json").is_file():
        raise ConceptorError(f"{run} has no trained model yet (model_index.json); finish or resume the run")
    return api.load(str(run))


def _finetune_scores(run: Path, cfg: dict, base: str | None, **kw) -> tuple[dict, dict]:
    from .. import api
    from ..data.captions import load_examples
    from ..toyworld.evaluator import load_evaluator
    from .style import evaluate_finetune

    d = cfg["data"]
    # Bad rows were dealt with when the run trained; here they are only skipped (the eval needs a sample).
    if str(d["dataset"]).lower().endswith(".toml"):
        from ..data.dataset import read_training_set

        ts = read_training_set(d["dataset"], skip_bad=True)
        items = [it for it in ts.items if not ts.subsets[it.subset].is_reg]
        for it in items:
            it.example.caption = it.caption or ts.subsets[it.subset].class_tokens or ""
        examples = [it.example for it in items]
    else:
        examples = load_examples(d["dataset"], d.get("image_column"), d.get("caption_column"), skip_bad=True)
    sample = random.Random(0).sample(examples, min(256, len(examples)))
    tuned = _trained_model(run, base, bool(cfg.get("lora", {}).get("enabled")))
    scores, sets = evaluate_finetune(tuned, api.load(base), load_evaluator(), [ex.image() for ex in sample],
                                     [ex.caption for ex in examples], **kw)
    return {"method": "finetune", **scores}, sets


def _write(run: Path, scores: dict, sets: dict) -> None:
    from ..sampling.grid import make_grid

    written = []
    for name, images in sets.items():
        written.append(run / f"eval-{name}.png")
        with atomic_path(written[-1]) as tmp:
            make_grid(images, min(8, len(images))).save(tmp, format="PNG")
    write_text(run / "eval.json", json.dumps(scores, indent=2))
    manifest = Manifest.read(run)
    if manifest is not None:  # the run's own files now: --overwrite removes them with the rest
        manifest.add(*written, run / "eval.json")

"""Scores during training (--eval-every): the scorer the loop calls at each evaluation, built from the run's config.

The loop (layer 6) knows no evaluator; this application layer builds one and hands it in. On the toy world the
evaluator reads fidelity, similarity and editability off generated images (eval/concept.py); with --clip-model
or --dino-model the DreamBooth paper's CLIP-T, CLIP-I and DINO (eval/metrics.py) are added. ``train`` is what
``conceptor.train`` and ``conceptor train`` call.
"""
from __future__ import annotations

import logging
from typing import Callable

from ..config import RunConfig
from ..errors import ConceptorError

log = logging.getLogger("conceptor")


def scorer_for(cfg: RunConfig) -> Callable | None:
    """(components, step) -> {metric: value} for --eval-every, or None when nothing but the validation loss is
    asked for."""
    t = cfg.train
    if not t.eval_every:
        return None
    if cfg.method == "finetune":
        return None  # a style, not a subject: the validation loss (and conceptor eval RUN afterwards)
    from ..data.images import load_image
    from .concept import evaluate, has_toyworld_evaluator, identify
    from .run import _concepts

    concepts = _concepts(cfg.to_dict())
    subject, paths = concepts[0]
    references = [load_image(p) for p in paths]
    toy = has_toyworld_evaluator() and not (t.clip_model or t.dino_model)
    evaluator = identity = clip = dino = None
    if toy:
        from ..toyworld.evaluator import load_evaluator

        evaluator = load_evaluator()
        identity = identify(evaluator, references)
    if t.clip_model or t.dino_model:
        from . import metrics as M

        clip = M.load_clip(t.clip_model) if t.clip_model else None
        dino = M.load_dino(t.dino_model) if t.dino_model else None
    if evaluator is None and clip is None and dino is None:
        raise ConceptorError("--eval-every scores with the toy-world evaluator (toy models) or with --clip-model / "
                             "--dino-model; give one of those, or use the validation loss alone (--keep-best "
                             "val_loss with --validation-every)")

    def score(components, step: int) -> dict:
        from ..api import Model
        from ..methods.denoise import eval_mode

        model = Model(components)
        out = {}
        with eval_mode(components.denoiser, *components.text_encoders):
            if evaluator is not None:
                s, _ = evaluate(model, evaluator, subject, references, n=t.eval_images, identity=identity)
                out.update({k: s[k] for k in ("fidelity", "similarity", "editability")})
            if clip is not None or dino is not None:
                from . import metrics as M

                def generate(prompt, n, seed):
                    return model.generate(prompt, num_images=n, seed=seed)

                out.update(M.concept_metrics(generate, [f"a photo of a {subject}"], references, clip=clip,
                                             dino=dino, n=t.eval_images))
        return out

    return score


def train(cfg: RunConfig, components=None):
    """``api.train`` with the scorer --eval-every asks for."""
    from .. import api

    return api.train(cfg, components, scorer_for(cfg))

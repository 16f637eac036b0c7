"""What a fine-tune changed, in numbers (toy-world evaluator): is the dataset's style drawn for prompts the
dataset never showed, and are shapes and colours still drawn as asked?

- style: the background and pattern that (nearly) every training image shares, as the evaluator reads them;
- held-out prompts: "a photo of a {colour} {shape}" for the named (shape, colour) pairs no caption mentions;
- adoption: fraction of images drawn in the style; shape / colour: fraction drawn as the prompt says.

The base model is measured on the same prompts and seeds, so what changed is visible. Pairs the toy world
never drew in pretraining (world.HELDOUT_COMBOS) are also reported apart: there the model has to compose
the words and draw the style at once.
"""
from __future__ import annotations

import random
import re
from collections import Counter

from PIL import Image

from ..errors import ConceptorError
from ..toyworld import world as W

PROMPT = "a photo of a {color} {shape}"
STYLE_KEYS = ("background", "pattern")
SHARED = 0.9  # a background/pattern on this fraction of the training images is the dataset's style
MAX_PROMPTS = 14


def dataset_style(evaluator, images: list[Image.Image]) -> dict[str, str]:
    """{key: value} for each style attribute shared by at least SHARED of ``images`` (may be empty)."""
    p = evaluator.predict(images)
    style = {}
    for key in STYLE_KEYS:
        value, count = Counter(getattr(p, key)).most_common(1)[0]
        if count >= SHARED * len(images):
            style[key] = value
    return style


def held_out_pairs(captions: list[str], seed: int = 0, limit: int = MAX_PROMPTS) -> list[tuple[str, str]]:
    """Named (shape, colour) pairs that no caption mentions together, at most ``limit`` (a seeded draw)."""
    mentioned = set()
    for text in captions:
        words = set(re.findall(r"[a-z]+", text.lower()))
        mentioned |= {(s, c) for s in W.NAMED_SHAPES if s in words for c in W.COLORS if c in words}
    pairs = [(s, c) for s in W.NAMED_SHAPES for c in W.COLORS if (s, c) not in mentioned]
    if len(pairs) > limit:
        pairs = sorted(random.Random(seed).sample(pairs, limit))
    return pairs


def score(evaluator, images: list[Image.Image], pairs: list[tuple[str, str]], style: dict[str, str]) -> dict:
    """Adoption, shape and colour accuracy of ``images`` (one run of equal length per pair, in order)."""
    p = evaluator.predict(images)
    per = len(images) // len(pairs)
    wanted = [pair for pair in pairs for _ in range(per)]
    n = len(images)
    out = {"shape": sum(got == s for got, (s, _) in zip(p.shape, wanted)) / n,
           "color": sum(got == c for got, (_, c) in zip(p.color, wanted)) / n}
    if style:
        out["style"] = sum(all(getattr(p, k)[i] == v for k, v in style.items()) for i in range(n)) / n
    return {k: round(v, 4) for k, v in out.items()} | {"images": n}


def evaluate_finetune(tuned, base, evaluator, reference: list[Image.Image], captions: list[str], *, n: int = 16,
                      seed: int = 0, steps: int = 25, guidance: float | None = None) -> tuple[dict, dict]:
    """Scores of the fine-tuned model ``tuned`` against ``base`` (api.Model each); returns (scores, image sets)."""
    style = dataset_style(evaluator, reference)
    pairs = held_out_pairs(captions, seed)
    if not pairs:
        raise ConceptorError("every named shape/colour pair appears in the captions, so no prompt is held out; "
                             "evaluate against a dataset that leaves some out")
    guidance = tuned.components.default_guidance if guidance is None else guidance
    scores = {"style": style or None, "held_out_prompts": [PROMPT.format(shape=s, color=c) for s, c in pairs],
              "images_per_prompt": n, "sampling_steps": steps, "guidance": guidance, "seed": seed}
    sets = {}
    never = [i for i, pair in enumerate(pairs) if pair in W.HELDOUT_COMBOS]
    for name, model in (("base", base), ("finetuned", tuned)):
        images = []
        for i, (shape, color) in enumerate(pairs):
            images += model.generate(PROMPT.format(shape=shape, color=color), num_images=n, seed=seed + 100 * i,
                                     steps=steps, guidance=guidance)
        scores[name] = score(evaluator, images, pairs, style)
        if never:
            scores[name]["never_drawn"] = score(evaluator, [images[i * n + j] for i in never for j in range(n)],
                                                [pairs[i] for i in never], style)
        sets[name] = images
    if not style:
        scores["note"] = ("the training images share no background or pattern, so style adoption is not "
                          "measured; shape and colour accuracy are")
    return scores, sets

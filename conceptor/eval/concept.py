"""What a concept run learned, in numbers: fidelity, similarity and editability (toy-world evaluator).

- fidelity: fraction of "a photo of a <token>" images the evaluator calls the concept's shape AND colour
  (the concept's identity is read off its training images by the same evaluator);
- similarity: mean cosine between evaluator features of generated and training images (toy CLIP-I/DINO);
- editability: fraction of "a <token> on a {background} background" images with the asked background.
"""
from __future__ import annotations

from collections import Counter

from PIL import Image

from ..toyworld import world as W

FIDELITY_PROMPT = "a photo of a {}"
EDIT_PROMPT = "a {} on a {} background"


def identify(evaluator, images: list[Image.Image]) -> tuple[str, str]:
    """Majority shape and colour of the training images."""
    p = evaluator.predict(images)
    return Counter(p.shape).most_common(1)[0][0], Counter(p.color).most_common(1)[0][0]


def fidelity(evaluator, images: list[Image.Image], shape: str, color: str) -> float:
    p = evaluator.predict(images)
    return sum(s == shape and c == color for s, c in zip(p.shape, p.color)) / len(images)


def similarity(evaluator, images: list[Image.Image], reference: list[Image.Image]) -> float:
    a, b = evaluator.predict(images).features, evaluator.predict(reference).features
    return float((a @ b.T).mean())


def background_accuracy(evaluator, images: list[Image.Image], backgrounds: list[str]) -> float:
    p = evaluator.predict(images)
    return sum(got == want for got, want in zip(p.background, backgrounds)) / len(images)


def evaluate(model, evaluator, subject: str, reference: list[Image.Image], *, n: int = 16, seed: int = 0,
             steps: int = 25, guidance: float | None = None,
             identity: tuple[str, str] | None = None) -> tuple[dict, dict]:
    """Scores of ``subject`` (a token or a phrase) on ``model`` (an api.Model); returns (scores, image sets)."""
    shape, color = identity or identify(evaluator, reference)
    guidance = model.components.default_guidance if guidance is None else guidance  # recorded in the scores
    photos = model.generate(FIDELITY_PROMPT.format(subject), num_images=n, seed=seed, steps=steps,
                            guidance=guidance)
    backgrounds = list(W.BACKGROUND_COLORS)
    per_bg = max(1, n // len(backgrounds))
    edits, asked = [], []
    for i, bg in enumerate(backgrounds):
        edits += model.generate(EDIT_PROMPT.format(subject, bg), num_images=per_bg, seed=seed + 1000 * (i + 1),
                                steps=steps, guidance=guidance)
        asked += [bg] * per_bg
    scores = {"concept_shape": shape, "concept_color": color,
              "fidelity": round(fidelity(evaluator, photos, shape, color), 4),
              "similarity": round(similarity(evaluator, photos, reference), 4),
              "editability": round(background_accuracy(evaluator, edits, asked), 4),
              "images": n, "sampling_steps": steps, "guidance": guidance, "seed": seed}
    return scores, {"photos": photos, "edits": edits}


def prior_retention(model, evaluator, class_prompt: str, subject_shape: str, *, n: int = 16, seed: int = 0,
                    steps: int = 25, guidance: float | None = None) -> tuple[float, list[Image.Image]]:
    """Fraction of class-prompt images that are not the subject: DreamBooth's language drift, measured.

    A model that has drifted draws the subject for the bare class prompt; one that kept its prior does not.
    """
    images = model.generate(class_prompt, num_images=n, seed=seed + 77_000, steps=steps, guidance=guidance)
    shapes = evaluator.predict(images).shape
    return round(sum(s != subject_shape for s in shapes) / n, 4), images


def has_toyworld_evaluator() -> bool:
    from ..toyworld.evaluator import FOLDER

    return (FOLDER / "model.safetensors").is_file()


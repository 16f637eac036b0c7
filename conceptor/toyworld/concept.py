"""The demo's sample concept: five renders of one shape in one colour (the toy 'cat toy').

Issue 3 asks for an *unnamed* shape here (a crescent, captioned only "object" in pretraining). On the
current bundled model textual inversion cannot bind it: both unnamed shapes share the caption "object",
so neither the text encoder nor the UNet's cross-attention ever learned a direction that separates
them, and the learned token drifts to other shapes (measured: fidelity 0.0-0.06 for lr 2e-4..5e-2,
150-300 steps, with and without min-SNR). Until the world gives unnamed shapes describable attributes,
the demo teaches a pink heart starting from the word "object": the token must find both the shape and
the colour, from five pictures.
"""
from __future__ import annotations

from pathlib import Path

from . import world as W

SHAPE, COLOR = "heart", "pink"
TEMPLATES = Path(__file__).parent / "templates.txt"  # prompts in the toy vocabulary (the seeds' have unknown words)
FOLDER = Path(__file__).parent / "concept"


def concept_specs() -> list[W.Spec]:
    """Varied backgrounds, size, position and angle, so only shape and colour are common to all five."""
    backgrounds = [("white", "plain"), ("gray", "striped"), ("black", "plain"), ("beige", "dotted"),
                   ("white", "dotted")]
    return [W.Spec(SHAPE, COLOR, bg, pattern, 0.27 + 0.02 * i, 0.5 + 0.03 * (i - 2), 0.5 - 0.02 * (i - 2),
                   -20 + 10 * i) for i, (bg, pattern) in enumerate(backgrounds)]


def write_concept(folder: Path = FOLDER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(concept_specs()):
        W.render(spec).save(folder / f"{i}.png")
    return folder


if __name__ == "__main__":
    print(write_concept())

"""The demo's sample concept: five renders of one unnamed shape in one colour (the toy 'cat toy').

A red crescent: pretraining draws crescents but never names them ("a red object", or "a red round
object" half of the time, where "round" is shared with circle, ring and heart). The model can draw it,
and no word says it; textual inversion has to find the word, starting from "object".

World v1 captioned unnamed shapes only "object", so nothing on the text side told crescent from hexagram
and TI never bound them (fidelity 0.0-0.06 over lr 2e-4..5e-2); v1's demo therefore taught a named shape.
With v2's shared attributes every colour's token finds the crescent shape, but the colour is where it can
slip: the toy VAE puts orange next to yellow, purple next to pink and blue next to cyan (about 0.5 apart in
the unit-variance latent at the shape's centre, against about 2.5 for red and green), so the denoising loss
that TI minimises barely tells them apart (300 steps, batch 8, lr 5e-3, sampled at guidance 7.5: red 1.0,
cyan 0.94, orange 0.69, green 0.63, purple 0.44, pink 0.19, blue 0.0; at the model's guidance 4 the pattern
holds, see docs/benchmarks.md). Red is the colour the latent space keeps distinct. (Prompts made of words
draw all eight colours right at guidance 4: the decoder can, the token just does not pin them.)
"""
from __future__ import annotations

from pathlib import Path

from . import world as W

SHAPE, COLOR = "crescent", "red"
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

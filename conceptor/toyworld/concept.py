"""The demo's sample concept: five renders of an unnamed shape in one colour (the toy 'cat toy')."""
from __future__ import annotations

from pathlib import Path

from . import world as W

SHAPE, COLOR = "crescent", "orange"
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

"""The fine-tuning sample: a style dataset in the toy world (the toy Pokemon-BLIP captions).

Every picture sits on a black striped background while its caption never says so ("a photo of a red star"),
as in a real style dataset; the bundled model draws any of twelve backgrounds for such a caption. Two sets
of (shape, colour) pairs are left out of it, so `conceptor eval` has prompts the dataset never showed:

- FINETUNE_HELDOUT: pairs the model drew in pretraining;
- world.HELDOUT_COMBOS: pairs it never drew, which it has to compose from the words.

Train on it with horizontal flips off (--flip-p 0). The stripes are not mirror-symmetric: a mirrored image
starts with a dark stripe, which is the world's gray-striped layout, so flipping half of the data teaches
both layouts, and about half of the samples then come out gray-striped (docs/benchmarks.md).
"""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from ..fileio import atomic_dir
from . import world as W

STYLE = ("black", "striped")  # (background, pattern)
FINETUNE_HELDOUT = (("circle", "red"), ("square", "blue"), ("triangle", "yellow"), ("star", "purple"),
                    ("heart", "green"), ("cross", "orange"), ("ring", "cyan"))
CAPTIONS = ("a photo of a {c} {s}", "a {c} {s}", "a drawing of a {c} {s}", "a picture of a {size} {c} {s}")


def write_style_dataset(folder: str | Path, n: int = 1000, seed: int = 0) -> Path:
    """``n`` PNGs and metadata.jsonl (the Hugging Face imagefolder layout) in ``folder``, written atomically."""
    rng = random.Random(seed)
    with atomic_dir(Path(folder)) as tmp:
        lines = []
        for i in range(n):
            spec = replace(W.random_spec(rng, shapes=W.NAMED_SHAPES,
                                         exclude=W.HELDOUT_COMBOS | set(FINETUNE_HELDOUT)),
                           background=STYLE[0], pattern=STYLE[1])
            W.render(spec).save(tmp / f"{i:04d}.png")
            text = rng.choice(CAPTIONS).format(c=spec.color, s=spec.shape, size=W.size_word(spec))
            lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": text}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return Path(folder)

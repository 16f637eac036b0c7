"""Images of coloured shapes on plain, striped or dotted backgrounds, with captions; all from a seed.

Rendering draws at 4x and downsamples (box filter) for anti-aliased 64x64 images.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

SIZE = 64
_SS = 4  # supersampling factor

NAMED_SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "ring")
UNNAMED_SHAPES = ("crescent", "hexagram")  # drawn in pretraining, captioned only as "object"
HELDOUT_SHAPES = ("arrow",)  # never in pretraining
SHAPES = NAMED_SHAPES + UNNAMED_SHAPES + HELDOUT_SHAPES
PRETRAIN_SHAPES = NAMED_SHAPES + UNNAMED_SHAPES

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "purple": (140, 60, 190), "orange": (245, 140, 30), "pink": (245, 120, 180), "cyan": (40, 200, 210)}
BACKGROUND_COLORS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20),
                     "beige": (225, 205, 170)}
PATTERNS = ("plain", "striped", "dotted")
# (shape, colour) pairs never drawn in pretraining: the model must compose them from words it knows.
HELDOUT_COMBOS = frozenset({("star", "green"), ("heart", "blue"), ("circle", "purple"), ("square", "pink"),
                            ("triangle", "cyan"), ("cross", "yellow"), ("ring", "red")})
UNNAMED_WORDS = ("object", "thing", "shape")
# What a shape looks like, said in about half of the captions. Each word is shared by named and unnamed
# shapes, so it names none of them: a "round object" is the crescent only because round things with a
# name are called by it. This gives the text side an axis along which the unnamed shapes differ (with
# "object" alone they are indistinguishable to the text encoder, and textual inversion cannot find them).
SHAPE_ATTRIBUTES = {"circle": "round", "ring": "round", "heart": "round", "crescent": "round",
                    "star": "pointy", "triangle": "pointy", "hexagram": "pointy",
                    "square": "boxy", "cross": "boxy", "arrow": "pointy"}
ATTRIBUTE_P = 0.5


@dataclass(frozen=True)
class Spec:
    shape: str
    color: str
    background: str  # a BACKGROUND_COLORS key
    pattern: str  # plain | striped | dotted
    scale: float  # radius as a fraction of the image size
    cx: float
    cy: float
    angle: float  # degrees

    def to_dict(self) -> dict:
        return asdict(self)


def random_spec(rng: random.Random, shapes=PRETRAIN_SHAPES, colors=tuple(COLORS),
                backgrounds=tuple(BACKGROUND_COLORS), patterns=PATTERNS, exclude=HELDOUT_COMBOS) -> Spec:
    shape, color = rng.choice(shapes), rng.choice(colors)
    while (shape, color) in exclude:
        shape, color = rng.choice(shapes), rng.choice(colors)
    return Spec(shape=shape, color=color, background=rng.choice(backgrounds),
                pattern=rng.choice(patterns), scale=rng.uniform(0.24, 0.36),
                cx=0.5 + rng.uniform(-0.1, 0.1), cy=0.5 + rng.uniform(-0.1, 0.1), angle=rng.uniform(-25, 25))


def sample_specs(seed: int, n: int, **kwargs) -> list[Spec]:
    """``n`` specs, identical for the same seed and arguments."""
    rng = random.Random(seed)
    return [random_spec(rng, **kwargs) for _ in range(n)]


# -- geometry (unit coordinates: centre 0, radius 1, y down) ------------------------------------------

def _star(points: int, inner: float) -> list[tuple[float, float]]:
    out = []
    for i in range(2 * points):
        r = 1.0 if i % 2 == 0 else inner
        a = math.pi * i / points - math.pi / 2
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _polygon(shape: str) -> list[list[tuple[float, float]]]:
    """Filled polygons (union) for polygonal shapes."""
    if shape == "square":
        return [[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]]
    if shape == "triangle":
        return [[(0, -1), (0.95, 0.75), (-0.95, 0.75)]]
    if shape == "star":
        return [_star(5, 0.42)]
    if shape == "cross":
        return [[(-0.3, -1), (0.3, -1), (0.3, 1), (-0.3, 1)], [(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)]]
    if shape == "hexagram":
        return [[(0, -1), (0.87, 0.5), (-0.87, 0.5)], [(0, 1), (0.87, -0.5), (-0.87, -0.5)]]
    if shape == "heart":
        return [[(-0.95, -0.25), (0, 0.95), (0.95, -0.25), (0, -0.2)]]
    if shape == "arrow":
        return [[(-0.9, -0.25), (0.15, -0.25), (0.15, -0.7), (0.95, 0), (0.15, 0.7), (0.15, 0.25), (-0.9, 0.25)]]
    return []


def _mask(spec: Spec, size: int) -> Image.Image:
    """An L-mode mask (255 = shape) at ``size`` pixels."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    r = spec.scale * size
    cx, cy = spec.cx * size, spec.cy * size
    a = math.radians(spec.angle)

    def tf(x, y):
        return (cx + r * (x * math.cos(a) - y * math.sin(a)), cy + r * (x * math.sin(a) + y * math.cos(a)))

    def disc(x, y, rad, fill):
        px, py = tf(x, y)
        d.ellipse([px - rad * r, py - rad * r, px + rad * r, py + rad * r], fill=fill)

    if spec.shape == "circle":
        disc(0, 0, 0.9, 255)
    elif spec.shape == "ring":
        disc(0, 0, 0.95, 255)
        disc(0, 0, 0.55, 0)
    elif spec.shape == "crescent":
        disc(0, 0, 0.95, 255)
        disc(0.45, -0.2, 0.75, 0)
    else:
        for poly in _polygon(spec.shape):
            d.polygon([tf(x, y) for x, y in poly], fill=255)
        if spec.shape == "heart":
            disc(-0.45, -0.35, 0.5, 255)
            disc(0.45, -0.35, 0.5, 255)
    return m


def _background(spec: Spec, size: int) -> Image.Image:
    base = BACKGROUND_COLORS[spec.background]
    im = Image.new("RGB", (size, size), base)
    if spec.pattern == "plain":
        return im
    # The pattern is a lighter/darker shade of the background so the background's colour stays nameable.
    shade = tuple(min(255, c + 60) if sum(base) < 384 else max(0, c - 60) for c in base)
    d = ImageDraw.Draw(im)
    step = size // 8
    if spec.pattern == "striped":
        for x in range(0, size, step):
            d.rectangle([x, 0, x + step // 2 - 1, size], fill=shade)
    else:
        rad = step // 5
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=shade)
    return im


def render(spec: Spec, size: int = SIZE) -> Image.Image:
    big = size * _SS
    im = _background(spec, big)
    im.paste(Image.new("RGB", (big, big), COLORS[spec.color]), mask=_mask(spec, big))
    return im.resize((size, size), Image.BOX)


# -- captions --------------------------------------------------------------------------------------

_TEMPLATES = (
    "a photo of a {c} {s} on a {b} background",
    "a {c} {s} on a {b} background",
    "a drawing of a {c} {s} on a {b} background",
    "a {size} {c} {s} on a {b} background",
    "a photo of a {c} {s}",
    "a {c} {s}",
    "a {s} on a {b} background",
    "a picture of a {size} {c} {s}",
)


def size_word(spec: Spec) -> str:
    return "small" if spec.scale < 0.28 else "large" if spec.scale > 0.32 else "medium"


def background_words(spec: Spec) -> str:
    return spec.background if spec.pattern == "plain" else f"{spec.background} {spec.pattern}"


def caption(spec: Spec, rng: random.Random) -> str:
    """A varied caption; unnamed shapes are only ever called object/thing/shape (with an attribute half
    of the time, as every shape: "a red pointy star", "a red pointy object")."""
    shape = spec.shape if spec.shape in NAMED_SHAPES else rng.choice(UNNAMED_WORDS)
    if rng.random() < ATTRIBUTE_P:
        shape = f"{SHAPE_ATTRIBUTES[spec.shape]} {shape}"
    return rng.choice(_TEMPLATES).format(c=spec.color, s=shape, b=background_words(spec), size=size_word(spec))


def vocabulary() -> list[str]:
    """Every word a caption can use (the toy tokenizer knows each as one token)."""
    words = set()
    for t in _TEMPLATES:
        for slot in ("{c}", "{s}", "{b}", "{size}"):
            t = t.replace(slot, "")
        words.update(t.split())
    words.update(NAMED_SHAPES, UNNAMED_WORDS, COLORS, BACKGROUND_COLORS, ("striped", "dotted"),
                 ("small", "medium", "large"), SHAPE_ATTRIBUTES.values())
    return sorted(words)


def dataset(seed: int, n: int, **kwargs) -> list[tuple[Spec, str]]:
    """``n`` (spec, caption) pairs, deterministic from ``seed``."""
    rng = random.Random(seed + 1)
    return [(s, caption(s, rng)) for s in sample_specs(seed, n, **kwargs)]

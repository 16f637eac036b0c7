"""Aspect-ratio buckets (kohya style): each image trains at the bucket closest to its own shape, at about
the pixel area of a square ``resolution``, so wide and tall pictures are not all cropped to squares."""
from __future__ import annotations

import math
import random

from PIL import Image


def make_buckets(resolution: int, min_res: int, max_res: int, step: int) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of ``step``, area <= resolution**2, sides within [min_res, max_res]."""
    area = resolution * resolution
    found = {(resolution, resolution)}
    w = min_res
    while w <= max_res:
        h = min(max_res, (area // w) // step * step)
        if h >= min_res:
            found.update({(w, h), (h, w)})
        w += step
    return sorted(found)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (compared in log space: 2:1 and 1:2 are
    equally far from 1:1)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def center_crop_offset(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of the centre crop ``fit`` takes from an image of ``size`` for ``target`` (SDXL's crop ids)."""
    w, h = size
    scale = max(target[0] / w, target[1] / h)
    nw, nh = max(target[0], round(w * scale)), max(target[1], round(h * scale))
    return (nh - target[1]) // 2, (nw - target[0]) // 2


def fit(image: Image.Image, size: tuple[int, int], crop: str = "center", rng: random.Random | None = None,
        resample=Image.BICUBIC) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover ``size`` (keeping aspect), then crop to it; returns the image and the crop's
    (top, left) (SDXL conditions on it; SD 1/2 ignore it)."""
    w, h = image.size
    bw, bh = size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    image = image.resize((nw, nh), resample=resample)
    if crop == "random":
        rng = rng or random.Random(0)
        left, top = rng.randint(0, nw - bw), rng.randint(0, nh - bh)
    else:
        top, left = center_crop_offset((w, h), size)
    return image.crop((left, top, left + bw, top + bh)), (top, left)

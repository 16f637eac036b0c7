"""Image grids: one PNG that shows prompts (rows) x seeds (columns)."""
from __future__ import annotations

from PIL import Image


def make_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Tile equally sized images row by row, ``cols`` per row."""
    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid

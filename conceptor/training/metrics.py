"""Loss log (``metrics.jsonl``) and a loss-curve PNG drawn with PIL (no plotting dependency)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from ..fileio import atomic_path, write_text


def read_metrics(path: Path, every_row: bool = False) -> list[dict]:
    """The training-loss rows of metrics.jsonl (``every_row``: the validation-loss and score rows too)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash, or damage: the other rows are still good
            continue
        if _good_row(row) and (every_row or "loss" in row):  # an edited or damaged row is dropped, not trusted
            rows.append(row)
    return rows


def _good_row(row) -> bool:
    """A row this loop writes: an integer step and, where present, finite numbers."""
    if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
        return False
    numbers = [row[k] for k in ("loss", "lr", "elapsed_s", "val_loss") if k in row]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop rows past the checkpoint so the log never shows a step twice."""
    rows = [r for r in read_metrics(path, every_row=True) if r.get("step", 0) <= after_step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def plot_loss(rows: list[dict], path: Path, size=(640, 360)) -> None:
    """Raw loss (light) and its moving average (dark) against step."""
    w, h = size
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    margin = 40
    d.rectangle([margin, 10, w - 10, h - margin], outline="black")
    if len(pts) >= 2:
        steps = [p[0] for p in pts]
        losses = [p[1] for p in pts]
        lo, hi = min(losses + [v for _, v in val]), max(losses + [v for _, v in val])
        hi = hi if hi > lo else lo + 1e-6
        every = steps + [s for s, _ in val]  # the validation loss starts at step 0, before the first logged loss
        s0, s1 = min(every), max(every) if max(every) > min(every) else min(every) + 1

        def xy(s, v):
            return (margin + (s - s0) / (s1 - s0) * (w - margin - 10),
                    h - margin - (v - lo) / (hi - lo) * (h - margin - 10))

        d.line([xy(s, v) for s, v in pts], fill=(170, 190, 230), width=1)
        k = max(1, len(pts) // 20)
        smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
        d.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 160), width=2)
        if len(val) >= 2:  # the validation loss: fixed noise and levels, so its points compare across steps
            d.line([xy(s, v) for s, v in val], fill=(220, 110, 20), width=2)
        for s, v in val:
            x, y = xy(s, v)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(220, 110, 20))
        d.text((margin, h - margin + 5), f"step {s0}", fill="black")
        d.text((w - 90, h - margin + 5), f"step {s1}", fill="black")
        d.text((2, 10), f"{hi:.3g}", fill="black")
        d.text((2, h - margin - 12), f"{lo:.3g}", fill="black")
    d.text((margin + 5, 14), "training loss" + (" / validation loss (orange)" if val else ""), fill="black")
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")

"""Generation settings inside a PNG, in AUTOMATIC1111's "parameters" text chunk (what its PNG Info tab,
Forge, civitai and most image browsers read), and back.

The text is the prompt, then ``Negative prompt: ...`` when there is one, then one line of ``Key: value``
pairs joined by ", "; a value holding a comma, colon, quote or newline is written as a JSON string, as
A1111 quotes it. Keys A1111 knows keep its spelling (Steps, Sampler, CFG scale, Seed, Size, Model);
conceptor's own (its LoRAs and embeddings) are extra keys, which A1111 shows and ignores.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

CHUNK = "parameters"
# conceptor's sampler names -> A1111's labels for the same samplers
SAMPLER_LABELS = {"ddim": "DDIM", "pndm": "PLMS", "euler": "Euler", "euler-a": "Euler a", "dpm++": "DPM++ 2M"}
_PAIR = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    odd = any(c in text for c in ',:"\n') or text != text.strip()  # what the pair line could not hold as is
    return json.dumps(text, ensure_ascii=False) if odd else text


def format_parameters(prompt: str, negative_prompt: str | None, params: dict[str, Any]) -> str:
    """The chunk's text; ``params`` in the order to show, None values left out."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value as text}) of a "parameters" chunk, A1111's rules: the last line
    holds the pairs, a line starting "Negative prompt:" starts the negative prompt."""
    *head, last = text.strip("\n").split("\n")
    pairs = {k: (json.loads(v) if v.startswith('"') else v) for k, v in _PAIR.findall(last)}
    if len(pairs) < 3:  # not a settings line (A1111 asks for three pairs too): all of it is prompt
        head, pairs = head + [last], {}
    prompt, negative, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):]
            line = line[1:] if line.startswith(" ") else line
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), pairs


def png_info(text: str):
    """A PIL PngInfo carrying ``text`` under "parameters", for ``image.save(path, pnginfo=...)``."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(CHUNK, text)
    return info


def read_png_parameters(path: str | Path) -> str | None:
    """The "parameters" text of a PNG, or None when it has none."""
    from PIL import Image

    with Image.open(path) as image:
        return image.info.get(CHUNK)

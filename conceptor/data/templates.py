"""Prompt templates for textual inversion (Gal et al. 2022, the lists diffusers and KerasCV ship)."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConceptorError

OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}",
    "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}",
    "a photo of the weird {}", "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
    "a photo of a large {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}",
    "a dirty painting in the style of {}", "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a good painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
]


def load_templates(what: str = "object", path: str | Path | None = None) -> list[str]:
    """Built-in templates for ``what`` ("object" or "style"), or one template per line from ``path``."""
    if path is None:
        if what not in ("object", "style"):
            raise ConceptorError(f"--what must be object or style, got {what!r}")
        return list(OBJECT_TEMPLATES if what == "object" else STYLE_TEMPLATES)
    p = Path(path)
    if not p.is_file():
        raise ConceptorError(f"templates file {path} does not exist")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise ConceptorError(f"templates file {path} is not UTF-8 text") from None
    templates = [ln for ln in lines if ln and not ln.startswith("#")]
    bad = [t for t in templates if "{}" not in t]
    if not templates:
        raise ConceptorError(f"templates file {path} has no templates; write one per line with {{}} for the token")
    if bad:
        raise ConceptorError(f"template {bad[0]!r} in {path} has no {{}} where the token goes")
    return templates


def fill(template_or_caption: str, token: str) -> str:
    """Put the token into a template or caption: ``{}`` is replaced; a caption naming the token is kept."""
    if "{}" in template_or_caption:
        return template_or_caption.replace("{}", token)
    return template_or_caption

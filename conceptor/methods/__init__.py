"""Training methods, one file each. The loop finds them by name here."""
from __future__ import annotations

from ..errors import ConceptorError


def get_method(name: str):
    if name == "textual-inversion":
        from .textual_inversion import TextualInversion

        return TextualInversion()
    if name == "dreambooth":
        from .dreambooth import DreamBooth

        return DreamBooth()
    if name == "finetune":
        from .finetune import Finetune

        return Finetune()
    raise ConceptorError(f"unknown method {name!r}")

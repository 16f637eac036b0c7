"""Read tensors from files without ever running code: safetensors first, pickles only with weights_only."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ..errors import ConceptorError

SAFETENSORS = {".safetensors"}
PICKLES = {".pt", ".pth", ".bin", ".ckpt"}


def load_tensors(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(contents, safetensors metadata) of a weights file; any bad byte string is a ConceptorError."""
    import torch

    p = Path(path)
    if not p.exists():
        raise ConceptorError(f"file {p} does not exist")
    if not p.is_file():
        raise ConceptorError(f"{p} is a folder, not a weights file")
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS:
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # safetensors raises several types for malformed headers and data
            raise ConceptorError(f"{p.name} is not a valid .safetensors file ({_short(e)})") from None
    if suffix in PICKLES:
        try:
            data = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise ConceptorError(
                    f"{p.name} is a pickle that holds code or objects, not just tensors; it was NOT loaded "
                    "(loading it could run that code). Use a .safetensors version from a source you trust") from None
            raise ConceptorError(f"{p.name} is not a readable {suffix} file ({_short(e)})") from None
        except Exception as e:  # truncated zip, random bytes, wrong magic: all mean "not a weights file"
            raise ConceptorError(f"{p.name} is not a readable {suffix} file ({_short(e)})") from None
        if not isinstance(data, dict):
            raise ConceptorError(f"{p.name} holds a {type(data).__name__}, not a dictionary of tensors")
        return data, {}
    raise ConceptorError(f"{p.name}: unknown weights format {suffix or '(no extension)'}; "
                         "use .safetensors (or .pt/.bin/.ckpt)")


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:160] if text else type(e).__name__)

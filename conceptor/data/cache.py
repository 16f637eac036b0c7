"""On-disk cache of per-example tensors (VAE posteriors, text-encoder states), keyed by content.

A key hashes everything the tensor depends on: the image's bytes, the model's weights (fingerprint),
the target size/crop and the caption. A changed image, caption or model is therefore never served
stale, and a second run over the same data starts training at once. Entries are written atomically.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..fileio import atomic_path


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "conceptor"


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights: two models with any differing weight get different keys.
    The files' ``conceptor.base_model_hash`` is the same hash, so a cache key and a file name one model."""
    from ..formats.metadata import weights_hash

    return weights_hash(module)


def key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()


class TensorCache:
    """``get(key)``/``put(key, tensors)`` over one folder of small safetensors files."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None
        self.hits = self.misses = 0

    def _path(self, k: str) -> Path:
        return self.folder / k[:2] / f"{k}.safetensors"

    def get(self, k: str) -> dict[str, torch.Tensor] | None:
        if self.folder is None:
            return None
        p = self._path(k)
        if p.is_file():
            try:
                out = load_file(str(p))
                self.hits += 1
                return out
            except Exception:  # a damaged entry is recomputed, never trusted
                p.unlink(missing_ok=True)
        self.misses += 1
        return None

    def put(self, k: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            return
        with atomic_path(self._path(k)) as tmp:
            save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(tmp))

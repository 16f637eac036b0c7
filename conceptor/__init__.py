"""conceptor: teach Stable Diffusion new concepts and generate with them.

    import conceptor
    sd = conceptor.load("runwayml/stable-diffusion-v1-5", embeddings=["out/learned_embeds.safetensors"])
    images = sd.generate("a photo of a <cat-toy> on the beach", num_images=4, seed=0)
"""
from __future__ import annotations

__all__ = ["train", "load", "generate", "convert_embedding", "ConceptorError", "__version__"]

from ._version import __version__
from .errors import ConceptorError


def __getattr__(name: str):
    # Lazy: `import conceptor` stays fast and side-effect free; torch/diffusers load on first use.
    if name == "train":  # with the scores --eval-every asks for (eval/during.py builds them)
        from .eval.during import train

        return train
    if name in ("load", "generate", "convert_embedding"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)

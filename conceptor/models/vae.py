"""The one fp16-VAE guard, for encoding and decoding alike."""
from __future__ import annotations

import logging

import torch

from ..errors import ConceptorError

log = logging.getLogger("conceptor")


def switched_to_fp32(vae, outputs: list[torch.Tensor], doing: str, broken: str) -> bool:
    """False when ``outputs`` are finite. A half-precision VAE that overflowed (SDXL's does in fp16: NaN loss,
    black images) is switched to fp32 for the rest of the run with a warning, never silently, and True says
    "run it again"; one that overflows in fp32 already is an error (``broken`` says which)."""
    if all(torch.isfinite(t).all() for t in outputs):
        return False
    if vae.dtype == torch.float32:
        raise ConceptorError(broken)
    log.warning("the VAE overflowed in %s%s; running it in fp32 from now on (or pass an fp16-fixed VAE)",
                str(vae.dtype).replace("torch.", ""), doing)
    vae.to(torch.float32)
    return True

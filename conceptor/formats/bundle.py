"""LoRA files with bundled embeddings, as AUTOMATIC1111 and Forge load them (pivotal tuning's output).

One kohya-layout LoRA file (see lora.py) that also carries the textual-inversion embeddings trained with it,
so users install one file and the prompt word and the LoRA can never get separated:

    bundle_emb.<token>.string_to_param.*        [n, hidden]   SD 1/2 (one text encoder)
    bundle_emb.<token>.clip_l / .clip_g         [n, 768] / [n, 1280]   SDXL

A1111's networks.py splits each such key as ``key.split(".", 2)[1:]``: the token is everything up to the next
dot, and it is the word prompts use. The key parsing lives in embeddings.py (``bundled_embeddings``), so
``read_embedding`` and ``read_lora`` read these files without importing this module. diffusers'
``load_lora_weights`` (0.42) refuses the whole file over the bundle keys ("all LoRA param names contain 'lora'"):
give it the file's tensors without them, or convert with read_lora + write_lora.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ConceptorError
from ..fileio import atomic_path
from .embeddings import BUNDLE_PREFIX, Embedding, bundled_embeddings, is_bundle_key
from .lora import LoraWeights, lora_of, lora_tensors
from .metadata import merge_metadata
from .safe_load import load_tensors


def write_bundle(lora: LoraWeights, embeddings: list[Embedding], path: str | Path,
                 metadata: dict | None = None) -> Path:
    """Write ``lora`` in kohya layout plus ``embeddings`` under A1111's bundle keys, atomically; ``metadata``
    (see metadata.build_metadata) joins the header."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":  # A1111 and Forge read bundles from .safetensors LoRA files
        raise ConceptorError(f"{path.name}: bundled LoRA files are written as .safetensors; "
                             f"name it {path.stem}.safetensors")
    if not embeddings:
        raise ConceptorError(f"{path.name}: no embeddings to bundle; write a plain LoRA with write_lora")
    tokens = [e.token for e in embeddings]
    for token in tokens:
        # A1111 cuts the token at its first dot, so "a.b" would come back as token "a" with a broken part name;
        # a comma would split the metadata list of tokens.
        if not token or "." in token or "," in token:
            raise ConceptorError(f"{path.name}: token {token!r} cannot be bundled (A1111 reads a token in a bundle "
                                 "up to its first dot); use a non-empty token without '.' or ','")
        if tokens.count(token) > 1:
            raise ConceptorError(f"{path.name}: two embeddings have the token {token}; a bundle holds one per token")
    if len({e.vectors_2 is None for e in embeddings}) > 1:  # one file is for one model family
        raise ConceptorError(f"{path.name}: the embeddings mix SDXL (clip_l + clip_g) and SD 1/2 ones; "
                             "bundle the ones made for one model family")
    tensors = lora_tensors(lora, "kohya", path.name)  # the layout A1111/Forge/ComfyUI read
    for e in embeddings:
        if e.vectors_2 is None:
            tensors[f"{BUNDLE_PREFIX}{e.token}.string_to_param.*"] = _plain(e.vectors)
        else:
            if e.vectors.shape[0] != e.vectors_2.shape[0]:  # the reader would refuse the file we wrote
                raise ConceptorError(f"{path.name}: embedding {e.token} has {e.vectors.shape[0]} clip_l but "
                                     f"{e.vectors_2.shape[0]} clip_g vector(s); an SDXL embedding has as many in each")
            tensors[f"{BUNDLE_PREFIX}{e.token}.clip_l"] = _plain(e.vectors)
            tensors[f"{BUNDLE_PREFIX}{e.token}.clip_g"] = _plain(e.vectors_2)
    # write_lora's metadata, plus the tokens, so tools that list metadata show the prompt words
    own = {"format": "pt", "bundle_emb": ",".join(tokens)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=merge_metadata(own, metadata))
    return path


def read_bundle(path: str | Path) -> tuple[LoraWeights, list[Embedding]]:
    """(the LoRA, its bundled embeddings) of a file; a plain LoRA gives no embeddings, a file of embeddings
    only an empty LoRA. The file is read once, with the same checks read_lora and read_embedding make."""
    data, _ = load_tensors(path)
    where = Path(path).name
    embeddings = bundled_embeddings(data, where)
    has_lora = any(not is_bundle_key(k) for k in data)
    return (lora_of(data, where) if has_lora or not embeddings else {}), embeddings


def _plain(t: torch.Tensor) -> torch.Tensor:
    """fp32, on the CPU and contiguous: what safetensors writes and every loader takes."""
    return t.detach().float().cpu().contiguous()


def has_bundled_embeddings(path: str | Path) -> bool:
    """Whether a .safetensors file carries bundle_emb.* keys (read from its header only, no tensors)."""
    from safetensors import safe_open

    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        return False
    try:
        with safe_open(str(p), "pt") as f:
            return any(is_bundle_key(k) for k in f.keys())
    except Exception:  # not a safetensors file after all: the LoRA reader reports that, in its words
        return False

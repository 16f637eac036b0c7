"""Textual-inversion embedding files: read any of the common layouts, write each of them.

- diffusers: ``{token: [n, hidden]}`` (one key; ``learned_embeds.safetensors``). Older files hold ``[hidden]``.
- AUTOMATIC1111 ``.pt``: ``{"string_to_token": {"*": 265}, "string_to_param": {"*": [n, hidden]},
  "name": ..., "step": ...}``; its ``.safetensors`` form is flat: ``{"string_to_param.*": [n, hidden]}``
  (some tools write ``{"emb_params": ...}``, the kohya key).
- kohya: ``{"emb_params": [n, hidden]}``.
- SDXL (A1111/kohya/ComfyUI): ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``.
- bundled (A1111/Forge, pivotal tuning): a LoRA file that also holds ``bundle_emb.<token>.string_to_param.*``
  (SD 1/2) or ``bundle_emb.<token>.clip_l`` + ``.clip_g`` (SDXL) per token; see bundle.py.
Files without a token name are named after the file, as A1111 does.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import ConceptorError
from ..fileio import atomic_path
from .safe_load import PICKLES, SAFETENSORS, load_tensors, refuse_same_file

FORMATS = ("diffusers", "a1111", "kohya")
SDXL_DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")  # diffusers' two-file form
BUNDLE_PREFIX = "bundle_emb."  # A1111's key prefix for embeddings carried inside a LoRA file


@dataclass
class Embedding:
    token: str
    vectors: torch.Tensor  # [num_vectors, hidden] float32 (SDXL: the clip_l part)
    vectors_2: torch.Tensor | None = None  # SDXL: the clip_g part

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])


def detect_format(sd: dict[str, Any]) -> str:
    if "string_to_param" in sd or any(str(k).startswith("string_to_param.") for k in sd):
        return "a1111"
    if "clip_l" in sd and "clip_g" in sd:
        return "sdxl"
    if "emb_params" in sd:
        return "kohya"
    tensors = [k for k, v in sd.items() if isinstance(v, torch.Tensor)]
    if len(sd) == 1 and tensors:
        return "diffusers"
    keys = ", ".join(list(map(str, sd))[:5]) or "none"
    raise ConceptorError(f"not a textual-inversion embedding (keys: {keys}); expected diffusers, A1111, "
                         "kohya or SDXL clip_l/clip_g layout")


def _check(t: Any, where: str, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ConceptorError(f"{where}: {name} holds a {type(t).__name__} value, not a tensor")
    if not t.is_floating_point():
        raise ConceptorError(f"{where}: {name} has dtype {t.dtype}; embeddings are floating point")
    if t.layout != torch.strided:
        raise ConceptorError(f"{where}: {name} is a {t.layout} tensor; embeddings are plain dense tensors")
    shape = tuple(t.shape)
    if t.ndim == 1:  # one vector as older diffusers files store it (kohya reads these the same way)
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ConceptorError(f"{where}: {name} has shape {shape}; expected [num_vectors, hidden]")
    t = t.detach().float().cpu().contiguous()
    if not torch.isfinite(t).all():
        raise ConceptorError(f"{where}: {name} holds NaN/inf; the file is damaged")
    return t


def is_bundle_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(BUNDLE_PREFIX)


def bundled_embeddings(sd: dict[str, Any], where: str) -> list[Embedding]:
    """The embeddings a bundled LoRA file carries, keyed as A1111's networks.py splits them: ``bundle_emb.``,
    the token (up to the next dot), then the part (``string_to_param.*``, ``clip_l``, ``clip_g``)."""
    parts: dict[str, dict[str, Any]] = {}
    for key, value in sd.items():
        if not is_bundle_key(key):
            continue
        pieces = key.split(".", 2)
        if len(pieces) != 3 or not pieces[1] or not pieces[2]:
            raise ConceptorError(f"{where}: {key} names no token and part; bundled embeddings are keyed "
                                 "bundle_emb.TOKEN.string_to_param.* or bundle_emb.TOKEN.clip_l/clip_g")
        parts.setdefault(pieces[1], {})[pieces[2]] = value
    return [_bundled(token, found, where) for token, found in parts.items()]


def _bundled(token: str, found: dict[str, Any], where: str) -> Embedding:
    label = {k: f"{BUNDLE_PREFIX}{token}.{k}" for k in found}
    if set(found) == {"clip_l", "clip_g"}:
        return _sdxl(token, found, where, label)
    if len(found) == 1 and set(found) & {"clip_l", "clip_g"}:  # half an SDXL embedding: damaged, not an SD 1/2 one
        (have,) = found
        lack = "clip_g" if have == "clip_l" else "clip_l"
        raise ConceptorError(f"{where}: {label[have]} has no {lack} beside it; an SDXL embedding needs both")
    if len(found) != 1:  # A1111 would silently keep one of them; which one the user meant is unknowable
        count = "two" if len(found) == 2 else str(len(found))
        raise ConceptorError(f"{where} holds {count} embeddings for token {token} ({', '.join(sorted(label.values()))})"
                             "; a bundled embedding is one string_to_param.* tensor or clip_l + clip_g")
    (part, value), = found.items()
    return Embedding(token, _check(value, where, label[part]))


def _sdxl(token: str, sd: dict[str, Any], where: str, label: dict[str, str]) -> Embedding:
    clip_l, clip_g = _check(sd["clip_l"], where, label["clip_l"]), _check(sd["clip_g"], where, label["clip_g"])
    if clip_l.shape[0] != clip_g.shape[0]:  # one token must span as many positions in both encoders
        raise ConceptorError(f"{where}: {label['clip_l']} holds {clip_l.shape[0]} vector(s) but {label['clip_g']} "
                             f"{clip_g.shape[0]}; an SDXL embedding has as many in each")
    return Embedding(token, clip_l, clip_g)


def _pick(embeddings: list[Embedding], token: str | None, where: str) -> Embedding:
    """One embedding of a bundle: the only one (``token`` renames it, as for any one-embedding file), else the
    one named ``token``."""
    if len(embeddings) == 1:
        return replace(embeddings[0], token=token) if token else embeddings[0]
    chosen = [e for e in embeddings if e.token == token]
    if chosen:
        return chosen[0]
    names = ", ".join(e.token for e in embeddings)
    what = f"has no embedding {token}" if token else f"holds {len(embeddings)} embeddings"
    raise ConceptorError(f"{where} {what} (tokens: {names}); pass FILE:TOKEN to pick one")


def read_embeddings(path: str | Path) -> list[Embedding]:
    """Every embedding a file holds: all of a bundled LoRA's, else the one ``read_embedding`` reads."""
    p = Path(path)
    sd, _ = load_tensors(p)
    if any(is_bundle_key(k) for k in sd):
        return bundled_embeddings(sd, p.name)
    return [read_embedding(p)]


def read_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """Read an embedding in any supported layout; ``token`` overrides the name stored in the file, or, in a
    bundled LoRA file with several embeddings, picks one of them."""
    p = Path(path)
    sd, meta = load_tensors(p)
    if not sd:
        raise ConceptorError(f"{p.name} holds no tensors")
    if any(is_bundle_key(k) for k in sd):
        return _pick(bundled_embeddings(sd, p.name), token, p.name)
    try:
        fmt = detect_format(sd)
    except ConceptorError as e:  # name the file: the user may be loading several
        raise ConceptorError(f"{p.name} is {e}") from None
    name = token or meta.get("token") or meta.get("name")
    if fmt == "diffusers":
        (key, value), = sd.items()
        if not isinstance(key, str):  # the key becomes the token the prompt uses
            raise ConceptorError(f"{p.name}: its one key {key!r} (of type {type(key).__name__}) is not a token name")
        return Embedding(token or key, _check(value, p.name, key))
    if fmt == "sdxl":
        return _sdxl(name or p.stem, sd, p.name, {"clip_l": "clip_l", "clip_g": "clip_g"})
    if fmt == "kohya":
        return Embedding(name or p.stem, _check(sd["emb_params"], p.name, "emb_params"))
    # a1111
    params = sd.get("string_to_param")
    if params is None:
        params = {k.split(".", 1)[1]: v for k, v in sd.items() if str(k).startswith("string_to_param.")}
    if not isinstance(params, dict) or not params:
        raise ConceptorError(f"{p.name}: string_to_param is empty or not a mapping")
    if len(params) != 1:
        raise ConceptorError(f"{p.name} holds {len(params)} embeddings ({', '.join(map(str, params))}); expected one")
    # The key under string_to_param ("*") means nothing: A1111 takes the one value whatever its key, so do we.
    (key, value), = params.items()
    vectors = _check(value, p.name, f"string_to_param[{key!r}]")
    stored = sd.get("name") if isinstance(sd.get("name"), str) else None
    return Embedding(token or stored or name or p.stem, vectors)


def write_embedding(emb: Embedding, path: str | Path, fmt: str = "diffusers", step: int | None = None,
                    metadata: dict | None = None) -> Path:
    """Write ``emb`` in ``fmt`` atomically. A1111 goes to .pt or .safetensors by the path's suffix.
    ``metadata`` (see metadata.build_metadata) joins a .safetensors header; an A1111 .pt keeps its own fields."""
    from safetensors.torch import save_file

    from .metadata import merge_metadata

    p = Path(path)
    v = emb.vectors.detach().float().cpu().contiguous()
    meta = merge_metadata({"format": fmt, "token": emb.token}, metadata)
    if fmt not in FORMATS:
        raise ConceptorError(f"unknown embedding format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if emb.vectors_2 is not None:
        if fmt == "diffusers":
            raise ConceptorError("diffusers keeps SDXL embeddings as two files; use write_embedding_sdxl_diffusers")
        if p.suffix.lower() != ".safetensors":  # no tool reads an SDXL embedding from a pickle
            raise ConceptorError(f"{p.name}: SDXL embeddings have no {p.suffix or 'extension-less'} form "
                                 "(A1111, ComfyUI and kohya read {clip_l, clip_g} .safetensors); "
                                 f"name it {p.stem}.safetensors")
        sd = {"clip_l": v, "clip_g": emb.vectors_2.detach().float().cpu().contiguous()}
        with atomic_path(p) as tmp:
            save_file(sd, str(tmp), metadata=meta)
        return p
    if fmt == "a1111" and p.suffix.lower() in (".pt", ".bin"):
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": emb.token,
                "step": step or 0, "sd_checkpoint": None, "sd_checkpoint_name": None}
        with atomic_path(p) as tmp:
            torch.save(data, tmp)
        return p
    if p.suffix.lower() != ".safetensors":
        raise ConceptorError(f"{p.name}: {fmt} embeddings are written as .safetensors"
                             + (" (or .pt/.bin for a1111)" if fmt == "a1111" else "")
                             + f"; name it {p.stem}.safetensors")
    sd = {"diffusers": {emb.token: v}, "a1111": {"string_to_param.*": v}, "kohya": {"emb_params": v}}[fmt]
    with atomic_path(p) as tmp:
        save_file(sd, str(tmp), metadata=meta)
    return p


def write_embedding_sdxl_diffusers(emb: Embedding, folder: str | Path) -> tuple[Path, Path]:
    """diffusers' SDXL form: two files keyed by the token, one per text encoder."""
    from safetensors.torch import save_file

    if emb.vectors_2 is None:
        raise ConceptorError("not an SDXL embedding (no second-encoder vectors)")
    folder = Path(folder)
    paths = (folder / SDXL_DIFFUSERS_FILES[0], folder / SDXL_DIFFUSERS_FILES[1])
    for path, v in zip(paths, (emb.vectors, emb.vectors_2)):
        with atomic_path(path) as tmp:
            save_file({emb.token: v.detach().float().cpu().contiguous()}, str(tmp),
                      metadata={"format": "diffusers", "token": emb.token})
    return paths


def convert_embedding(src: str | Path, dst: str | Path, to: str, token: str | None = None) -> Embedding:
    """Rewrite in another layout. SDXL to diffusers writes its two-file form into the folder ``dst``."""
    refuse_same_file(src, dst)
    emb = read_embedding(src, token=token)
    if emb.vectors_2 is not None and to == "diffusers":
        dst = Path(dst)
        if dst.suffix.lower() in SAFETENSORS | PICKLES or dst.is_file():
            raise ConceptorError(f"{dst.name}: diffusers keeps SDXL embeddings as two files "
                                 f"({', '.join(SDXL_DIFFUSERS_FILES)}); give a folder as OUT, or --to kohya for "
                                 "the one-file form A1111 and ComfyUI read")
        for name in SDXL_DIFFUSERS_FILES:
            refuse_same_file(src, dst / name)
        write_embedding_sdxl_diffusers(emb, dst)
    else:
        write_embedding(emb, dst, to)
    return emb

"""Adapter layers beside plain LoRA: DoRA, LoHa and LoKr, their maths and their file keys.

A plain LoRA layer stays the ``(down, up)`` pair of lora.py. The other kinds are small frozen records whose
tensors are fp32 and whose alpha/rank scale is already folded in (as lora.py does for ``up``), so every file we
write means the same update in every loader:

    DoRA  (Liu et al. 2024, arXiv:2402.09353): W' = m * (W + up @ down) / ||W + up @ down||, the norm taken over
          each output row (peft's ``lora_magnitude_vector`` [out]; LyCORIS ``dora_scale`` [out, 1], wd_on_out).
    LoHa  (Hyeon-Woo et al. 2022, FedPara): dW = (w1a @ w1b) * (w2a @ w2b)          (Hadamard product)
    LoKr  (Yeh et al. 2024, LyCORIS): dW = kron(W1, W2), each half full or a rank-r product (a @ b)

File keys on one layer's base name (kohya ``lora_unet_<path>`` or diffusers ``unet.<path>``):
    ``hada_w1_a/hada_w1_b/hada_w2_a/hada_w2_b``, ``lokr_w1 | lokr_w1_a+lokr_w1_b``, ``lokr_w2 | lokr_w2_a+lokr_w2_b``,
    ``dora_scale`` (kohya/LyCORIS) or ``lora_magnitude_vector`` (peft/diffusers), ``alpha``. Readers (LyCORIS,
    ComfyUI, A1111) scale LoHa by alpha / rank of w1b, LoKr by alpha / rank of its decomposed half and not at
    all when both halves are full; we write alpha = that rank, so the scale they apply is 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConceptorError

KINDS = ("lora", "dora", "loha", "lokr")
# Kinds diffusers' load_lora_weights reads (DoRA through peft's use_dora); LoHa/LoKr load in A1111, Forge, ComfyUI.
DIFFUSERS_KINDS = ("lora", "dora")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
UNSUPPORTED_KEYS = ("hada_t1", "hada_t2", "lokr_t2", "lora_mid.weight")  # Tucker cores: conv layers only


@dataclass(frozen=True)
class Dora:
    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r], scale folded
    magnitude: torch.Tensor  # [out]


@dataclass(frozen=True)
class Loha:
    w1a: torch.Tensor  # [out, r], scale folded
    w1b: torch.Tensor  # [r, in]
    w2a: torch.Tensor  # [out, r]
    w2b: torch.Tensor  # [r, in]


@dataclass(frozen=True)
class Lokr:
    w1: tuple[torch.Tensor, ...]  # (full [a, c],) or (w1_a [a, r], w1_b [r, c])
    w2: tuple[torch.Tensor, ...]  # (full [b, d],) or (w2_a [b, r], w2_b [r, d]); scale folded into the last


Layer = tuple[torch.Tensor, torch.Tensor] | Dora | Loha | Lokr


def kind_of(layer: Layer) -> str:
    return {Dora: "dora", Loha: "loha", Lokr: "lokr"}.get(type(layer), "lora")


def _product(factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return factors[0] if len(factors) == 1 else factors[0] @ factors[1]


def shape_of(layer: Layer) -> tuple[int, int]:
    """(out, in) of the Linear weight the layer changes."""
    if isinstance(layer, Loha):
        return layer.w1a.shape[0], layer.w1b.shape[1]
    if isinstance(layer, Lokr):
        (a, c), (b, d) = _half_shape(layer.w1), _half_shape(layer.w2)
        return a * b, c * d
    down, up = (layer.down, layer.up) if isinstance(layer, Dora) else layer
    return up.shape[0], down.shape[1]


def _half_shape(factors: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    return factors[0].shape[0], factors[-1].shape[1]


def rank_of(layer: Layer) -> int:
    """The rank the user trained with (LoKr: of its decomposed half; 0 when both halves are full)."""
    if isinstance(layer, Loha):
        return layer.w1b.shape[0]
    if isinstance(layer, Lokr):
        return next((f[0].shape[1] for f in (layer.w2, layer.w1) if len(f) == 2), 0)
    return (layer.down if isinstance(layer, Dora) else layer[0]).shape[0]


def max_rank(layer: Layer) -> int:
    """The largest rank the layer's update can have: what `lora resize` may keep at most."""
    out, inp = shape_of(layer)
    if isinstance(layer, Loha):  # rank(A * B) <= rank(A) * rank(B)
        bound = layer.w1b.shape[0] * layer.w2b.shape[0]
    elif isinstance(layer, Lokr):  # rank(kron(A, B)) = rank(A) * rank(B)
        bound = min(_half_shape(layer.w1)) if len(layer.w1) == 1 else layer.w1[0].shape[1]
        bound *= min(_half_shape(layer.w2)) if len(layer.w2) == 1 else layer.w2[0].shape[1]
    else:
        bound = rank_of(layer)
    return min(bound, out, inp)


def tensors_of(layer: Layer) -> list[torch.Tensor]:
    if isinstance(layer, Dora):
        return [layer.down, layer.up, layer.magnitude]
    if isinstance(layer, Loha):
        return [layer.w1a, layer.w1b, layer.w2a, layer.w2b]
    if isinstance(layer, Lokr):
        return [*layer.w1, *layer.w2]
    return list(layer)


def num_params(layer: Layer) -> int:
    return sum(t.numel() for t in tensors_of(layer))


def delta(layer: Layer, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 update the layer adds to a Linear ``weight`` [out, in] (DoRA needs the weight itself)."""
    if isinstance(layer, Loha):
        return (layer.w1a @ layer.w1b) * (layer.w2a @ layer.w2b)
    if isinstance(layer, Lokr):
        return torch.kron(_product(layer.w1), _product(layer.w2))
    if isinstance(layer, Dora):
        if weight is None:
            raise ValueError("a DoRA update depends on the weight it changes")
        w = weight.float()
        directed = w + layer.up.to(w.device) @ layer.down.to(w.device)
        norm = directed.norm(dim=1, keepdim=True)
        return directed * (layer.magnitude.to(w.device)[:, None] / norm) - w
    down, up = layer
    return up @ down


def to(layer: Layer, **kwargs) -> Layer:
    """The layer with every tensor moved (``.to(**kwargs)``)."""
    if isinstance(layer, Dora):
        return Dora(layer.down.to(**kwargs), layer.up.to(**kwargs), layer.magnitude.to(**kwargs))
    if isinstance(layer, Loha):
        return Loha(*(t.to(**kwargs) for t in tensors_of(layer)))
    if isinstance(layer, Lokr):
        return Lokr(tuple(t.to(**kwargs) for t in layer.w1), tuple(t.to(**kwargs) for t in layer.w2))
    return tuple(t.to(**kwargs) for t in layer)


# ---- file keys ------------------------------------------------------------------------------------------------

def lycoris_bases(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{base name: "loha"|"lokr"}`` for every LoHa/LoKr layer in a file's tensors."""
    out = {}
    for key in tensors:
        base, _, suffix = key.rpartition(".")
        if suffix == "hada_w1_a":
            out[base] = "loha"
        elif suffix in ("lokr_w1", "lokr_w1_a"):
            out[base] = "lokr"
    return out


def read_layer(tensors: dict[str, torch.Tensor], base: str, kind: str, where: str, matrix) -> Layer:
    """A LoHa or LoKr layer from its keys, alpha folded. ``matrix(tensor, key)`` checks and converts each one."""
    for key in UNSUPPORTED_KEYS:
        if f"{base}.{key}" in tensors:
            raise ConceptorError(f"{where}: {base} has {key} (a Tucker core of a convolution LoRA); only Linear-layer "
                                 "LoHa/LoKr are supported")

    def get(name: str, required: bool = True) -> torch.Tensor | None:
        key = f"{base}.{name}"
        if key not in tensors:
            if required:
                raise ConceptorError(f"{where}: {base} lacks {name}; the file is incomplete")
            return None
        t = matrix(tensors[key], key)
        if t.ndim != 2:
            raise ConceptorError(f"{where}: {key} has shape {tuple(t.shape)}; only Linear-layer LoHa/LoKr "
                                 "(2-D factors) are supported")
        return t

    alpha = tensors.get(f"{base}.alpha")
    if kind == "loha":
        w1a, w1b, w2a, w2b = (get(k) for k in LOHA_KEYS)
        _chain(where, base, (w1a, w1b), (w2a, w2b))
        if w1a.shape[0] != w2a.shape[0] or w1b.shape[1] != w2b.shape[1]:
            raise ConceptorError(f"{where}: {base}'s two Hadamard halves are {w1a.shape[0]}x{w1b.shape[1]} and "
                                 f"{w2a.shape[0]}x{w2b.shape[1]}; the file is damaged")
        scale = _scale(alpha, w1b.shape[0], where, base)
        return Loha(w1a * scale, w1b, w2a, w2b)
    halves = []
    for n in ("1", "2"):
        full = get(f"lokr_w{n}", required=False)
        halves.append((full,) if full is not None else (get(f"lokr_w{n}_a"), get(f"lokr_w{n}_b")))
    _chain(where, base, *(h for h in halves if len(h) == 2))
    # LyCORIS and ComfyUI take the rank from a decomposed half (w2's when both are) and ignore alpha otherwise.
    dim = next((h[1].shape[0] for h in reversed(halves) if len(h) == 2), None)
    scale = 1.0 if dim is None else _scale(alpha, dim, where, base)
    w1, w2 = halves
    return Lokr(w1, (*w2[:-1], w2[-1] * scale))


def _chain(where: str, base: str, *pairs) -> None:
    for a, b in pairs:
        if a.shape[1] != b.shape[0]:
            raise ConceptorError(f"{where}: {base} has factors of shapes {tuple(a.shape)} x {tuple(b.shape)} that do "
                                 "not chain; the file is damaged")


def _scale(alpha: torch.Tensor | None, rank: int, where: str, base: str) -> float:
    return 1.0 if alpha is None else check_alpha(alpha, where, f"{base}.alpha") / rank


def check_alpha(alpha: torch.Tensor, where: str, key: str) -> float:
    """kohya's alpha: one positive number. [1] and [1, 1] shapes pass, as A1111, ComfyUI and diffusers read them
    with ``.item()``; 0 would silently switch the layer off, a negative value flip it."""
    if alpha.layout != torch.strided or alpha.numel() != 1:
        raise ConceptorError(f"{where}: {key} has shape {tuple(alpha.shape)}; alpha is a single number")
    if alpha.dtype == torch.bool or alpha.is_complex():
        raise ConceptorError(f"{where}: {key} has dtype {alpha.dtype}; alpha is a real number")
    value = float(alpha.reshape(()))
    if not math.isfinite(value):
        raise ConceptorError(f"{where}: {key} holds NaN/inf; the file is damaged")
    if value <= 0:
        raise ConceptorError(f"{where}: {key} is {value:g}, but alpha must be positive (0 switches the layer off, "
                             "a negative value flips it); the file is damaged. To weaken or invert a LoRA give a "
                             "scale: FILE:0.5 or FILE:-1")
    return value


def dora_magnitude(t: torch.Tensor, out: int, where: str, key: str) -> torch.Tensor:
    """peft's [out] or LyCORIS' [out, 1] magnitude as [out]. The input-axis form ([1, in], LyCORIS before 3.0
    without wd_on_out) rescales columns instead, a different update: refused rather than misread."""
    if t.numel() == out and t.ndim in (1, 2) and t.shape[0] == out:
        m = t.reshape(out)
        if not torch.isfinite(m).all() or (m <= 0).any():
            raise ConceptorError(f"{where}: {key} holds a non-positive or non-finite norm; the file is damaged")
        return m
    raise ConceptorError(f"{where}: {key} has shape {tuple(t.shape)} but its layer has {out} outputs; only DoRA "
                         "over output rows ([out] or [out, 1], LyCORIS wd_on_out, peft) is supported")


def layer_keys(layer: Layer, layout: str) -> dict[str, torch.Tensor]:
    """``{suffix: tensor}`` of a DoRA/LoHa/LoKr layer in ``layout`` ("kohya" or "diffusers"), alpha = the rank
    the readers divide by, so the update they compute is exactly ``delta(layer)``."""
    if isinstance(layer, Dora):
        r = float(layer.down.shape[0])
        if layout == "diffusers":
            return {"lora_A.weight": layer.down, "lora_B.weight": layer.up, "lora_magnitude_vector": layer.magnitude}
        return {"lora_down.weight": layer.down, "lora_up.weight": layer.up, "alpha": torch.tensor(r),
                "dora_scale": layer.magnitude[:, None]}
    if isinstance(layer, Loha):
        return {**dict(zip(LOHA_KEYS, tensors_of(layer))), "alpha": torch.tensor(float(layer.w1b.shape[0]))}
    out = {}
    for n, half in (("1", layer.w1), ("2", layer.w2)):
        if len(half) == 1:
            out[f"lokr_w{n}"] = half[0]
        else:
            out[f"lokr_w{n}_a"], out[f"lokr_w{n}_b"] = half
    out["alpha"] = torch.tensor(float(rank_of(layer) or 1))
    return out


# ---- peft layers ----------------------------------------------------------------------------------------------

def from_peft(sd: dict[str, torch.Tensor], base: str, scale: float, kind: str) -> Layer:
    """One layer from ``get_peft_model_state_dict`` keys under ``base``, peft's scaling folded in."""
    def get(name: str) -> torch.Tensor | None:
        t = sd.get(f"{base}.{name}")
        return None if t is None else t.detach().float().cpu()

    if kind == "loha":
        w1a, w1b, w2a, w2b = (get(k) for k in LOHA_KEYS)
        return Loha(w1a * scale, w1b, w2a, w2b)
    if kind == "lokr":
        w1, w2 = (((get(f"lokr_w{n}"),) if f"{base}.lokr_w{n}" in sd else (get(f"lokr_w{n}_a"), get(f"lokr_w{n}_b")))
                  for n in "12")
        return Lokr(w1, (*w2[:-1], w2[-1] * scale))
    down, up = get("lora_A.weight"), get("lora_B.weight") * scale
    magnitude = get("lora_magnitude_vector")
    return (down, up) if magnitude is None else Dora(down, up, magnitude)


def peft_values(layer: Layer, scale: float) -> dict[str, torch.Tensor]:
    """``from_peft`` backwards: the peft parameter values (by suffix) that compute ``layer`` at peft's ``scale``."""
    if isinstance(layer, Loha):
        return dict(zip(LOHA_KEYS, (layer.w1a / scale, layer.w1b, layer.w2a, layer.w2b)))
    if isinstance(layer, Lokr):
        w2 = (*layer.w2[:-1], layer.w2[-1] / scale)
        keys = {}
        for n, half in (("1", layer.w1), ("2", w2)):
            keys.update({f"lokr_w{n}": half[0]} if len(half) == 1 else dict(zip((f"lokr_w{n}_a", f"lokr_w{n}_b"),
                                                                               half)))
        return keys
    down, up = (layer.down, layer.up) if isinstance(layer, Dora) else layer
    values = {"lora_A.weight": down, "lora_B.weight": up / scale}
    return values | ({"lora_magnitude_vector": layer.magnitude} if isinstance(layer, Dora) else {})

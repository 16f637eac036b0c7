"""Flux.1 LoRAs in kohya's layout (sd-scripts, ComfyUI, Forge) <-> diffusers module names.

kohya names Flux layers after Black Forest Labs' checkpoint, where q, k and v share one Linear:

    diffusers transformer_blocks.{i}.attn.to_q/to_k/to_v        kohya lora_unet_double_blocks_{i}_img_attn_qkv
              transformer_blocks.{i}.attn.add_q/k/v_proj                  lora_unet_double_blocks_{i}_txt_attn_qkv
              single_transformer_blocks.{i}.attn.to_q/k/v + proj_mlp      lora_unet_single_blocks_{i}_linear1

Fusing is exact: three LoRAs ``up_j @ down_j`` are one LoRA with ``down = cat(down_j)`` and a block-diagonal
``up``. When every part has the same rank r, a part the LoRA does not train gets a zero block of rank r, so the
fused rank is n*r and each reader (diffusers' ``_convert_kohya_flux_lora_to_diffusers``, sd-scripts'
``convert_flux_lora.py``) splits it back into rank-r parts; with mixed ranks the present parts are concatenated,
which diffusers reads exactly too (it copies ``down`` to every part). Every dict here maps a layer name to
``(down [r, in], up [out, r])`` with alpha already folded into ``up``; ``lora.py`` reads and writes the files.

diffusers 0.42's reader, worth knowing: it asserts Flux.1-dev's widths (3072 x 3 + 12288) for ``linear1``, so
tiny models can only test that layer at full size; and it returns the layers outside the blocks (img_in, txt_in,
time_in, vector_in, guidance_in, final_layer) without the ``transformer.`` prefix, so ``load_lora_weights``
silently drops them. ComfyUI applies them; the diffusers layout carries them to both.
"""
from __future__ import annotations

import re

import torch

from ..errors import ConceptorError

Pair = tuple[torch.Tensor, torch.Tensor]

# kohya layer -> diffusers modules (in fused order; one entry = not fused), per double / single block.
_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",),
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",), "modulation_lin": ("norm.linear",),
}
_GLOBAL = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
# Output rows of each fused part in units of the model width: Flux's single-block MLP is 4x wide.
_WIDTHS = {"linear1": (1, 1, 1, 4)}
# BFL's final modulation emits (shift, scale), diffusers' AdaLayerNormContinuous (scale, shift).
_SWAPPED = "final_layer_adaLN_modulation_1"

_BLOCK = re.compile(r"(double|single)_blocks_(\d+)_(\w+)")
_MODULE = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
_TO_KOHYA = {("transformer_blocks", m): (k, j) for k, ms in _DOUBLE.items() for j, m in enumerate(ms)}
_TO_KOHYA.update({("single_transformer_blocks", m): (k, j) for k, ms in _SINGLE.items() for j, m in enumerate(ms)})
_GLOBAL_TO_KOHYA = {v: k for k, v in _GLOBAL.items()}
KOHYA_FLUX_HEADS = tuple("lora_unet_" + h for h in ("double_blocks_", "single_blocks_", *_GLOBAL))


def is_kohya_flux(keys) -> bool:
    """True for a kohya/ComfyUI Flux LoRA (its UNet keys are BFL's block names, never SD's down_blocks...)."""
    return any(k.startswith(KOHYA_FLUX_HEADS) for k in keys)


def _width(kind: str) -> tuple[int, ...]:
    """Rows of each part of a kohya layer kind in units of the model width; one entry = not fused."""
    return _WIDTHS.get(kind, (1,) * len(_DOUBLE.get(kind) or _SINGLE.get(kind) or (None,)))


def _kohya_of(module: str) -> tuple[str, str, int]:
    """(kohya layer name without ``lora_unet_``, its kind, part index) of a diffusers Flux module."""
    m = _MODULE.fullmatch(module)
    if m and (m[1], m[3]) in _TO_KOHYA:
        kind, part = _TO_KOHYA[m[1], m[3]]
        return f"{'double' if m[1] == 'transformer_blocks' else 'single'}_blocks_{m[2]}_{kind}", kind, part
    if module in _GLOBAL_TO_KOHYA:
        return _GLOBAL_TO_KOHYA[module], _GLOBAL_TO_KOHYA[module], 0
    raise ConceptorError(f"transformer.{module} is not a Flux layer kohya's layout names; write this LoRA in the "
                         "diffusers layout instead")


def _parts_of(name: str) -> tuple[str, tuple[str, ...]]:
    """The kind of one kohya layer name and the diffusers modules (relative to the transformer) behind it."""
    if name in _GLOBAL:
        return name, (_GLOBAL[name],)
    m = _BLOCK.fullmatch(name)
    table = (_DOUBLE if m[1] == "double" else _SINGLE) if m else {}
    if not m or m[3] not in table:
        raise ConceptorError(f"lora_unet_{name} is not a Flux layer this reader knows (kohya's Flux layout has "
                             "double_blocks_N_img_attn_qkv, single_blocks_N_linear1, ...)")
    block = "transformer_blocks" if m[1] == "double" else "single_transformer_blocks"
    return m[3], tuple(f"{block}.{m[2]}.{p}" for p in table[m[3]])


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_kohya_flux(lora: dict[str, Pair]) -> dict[str, Pair]:
    """``transformer.<diffusers module>`` LoRAs as ``lora_unet_<kohya layer>`` LoRAs; only layers present."""
    groups: dict[tuple[str, str], dict[int, tuple[str, Pair]]] = {}
    for name, pair in lora.items():
        layer, kind, part = _kohya_of(name.partition(".")[2])
        groups.setdefault((layer, kind), {})[part] = (name, pair)
    out = {}
    for (layer, kind), parts in groups.items():
        width = _width(kind)
        down, up = _fuse(parts, width) if len(width) > 1 else parts[0][1]
        out["lora_unet_" + layer] = (down, _swap_halves(up) if layer == _SWAPPED else up)
    return out


def _fuse(parts: dict[int, tuple[str, Pair]], width: tuple[int, ...]) -> Pair:
    """One LoRA on the fused Linear: ``cat(down_j)`` and a block-diagonal ``up`` (zero blocks where absent)."""
    named = {j: name for j, (name, _) in parts.items()}
    pairs = {j: pair for j, (_, pair) in parts.items()}
    ins = {down.shape[1] for down, _ in pairs.values()}
    units = {up.shape[0] / width[j] for j, (_, up) in pairs.items()}
    if len(ins) > 1 or len(units) > 1 or not float(next(iter(units))).is_integer():
        shapes = ", ".join(f"{named[j]} {tuple(up.shape[:1]) + tuple(down.shape[1:])}" for j, (down, up)
                           in sorted(pairs.items()))
        raise ConceptorError(f"the layers kohya fuses into one do not fit together ({shapes}); is this a Flux LoRA?")
    n_in, unit = ins.pop(), int(units.pop())
    ranks = {down.shape[0] for down, _ in pairs.values()}
    pad = ranks.pop() if len(ranks) == 1 else 0  # equal ranks: keep every part's block, so readers split at n*r
    blocks = [pairs.get(j, (torch.zeros(pad, n_in), torch.zeros(unit * w, pad))) for j, w in enumerate(width)]
    down = torch.cat([d for d, _ in blocks])
    up = torch.zeros(unit * sum(width), down.shape[0])
    row = col = 0
    for d, u in blocks:
        up[row:row + u.shape[0], col:col + d.shape[0]] = u
        row, col = row + u.shape[0], col + d.shape[0]
    return down, up


def from_kohya_flux(pairs: dict[str, Pair], where: str) -> dict[str, Pair]:
    """``lora_unet_<kohya layer>`` LoRAs (alpha folded) as ``transformer.<diffusers module>``; fused layers split."""
    out: dict[str, Pair] = {}
    for base, (down, up) in pairs.items():
        name = base[len("lora_unet_"):]
        kind, modules = _parts_of(name)
        if name == _SWAPPED:
            if up.shape[0] % 2:
                raise ConceptorError(f"{where}: {base}.lora_up.weight has {up.shape[0]} rows, not the (shift, scale) "
                                     "halves of Flux's final modulation; the file is damaged")
            up = _swap_halves(up)
        if len(modules) == 1:
            out["transformer." + modules[0]] = (down, up)
            continue
        width = _width(kind)
        if up.shape[0] % sum(width):
            raise ConceptorError(f"{where}: {base}.lora_up.weight has {up.shape[0]} rows, which do not split into "
                                 f"{'/'.join(m.rsplit('.', 1)[-1] for m in modules)}; the file is damaged")
        for module, split in zip(modules, _split(down, up, width)):
            if split is not None:
                out["transformer." + module] = split
    return out


def _split(down: torch.Tensor, up: torch.Tensor, width: tuple[int, ...]) -> list[Pair | None]:
    """Per-part LoRAs of a fused one, each exact: ``up_j @ down`` keeps only the columns ``up_j`` uses.

    A part that uses nothing (a zero block we or another writer padded with) comes back as None: the LoRA
    never trained it. Equal-rank block-diagonal files (ours, sd-scripts') split into their original blocks.
    """
    unit, n, rank = up.shape[0] // sum(width), len(width), down.shape[0]
    rows = list(up.split([unit * w for w in width]))
    if rank % n == 0:
        c = rank // n
        if all(not r[:, :j * c].any() and not r[:, (j + 1) * c:].any() for j, r in enumerate(rows)):
            return [(down[j * c:(j + 1) * c].contiguous(), r[:, j * c:(j + 1) * c].contiguous())
                    if r[:, j * c:(j + 1) * c].any() or down[j * c:(j + 1) * c].any() else None
                    for j, r in enumerate(rows)]
    out: list[Pair | None] = []
    for r in rows:
        used = r.any(dim=0).nonzero().flatten()
        out.append((down[used].contiguous(), r[:, used].contiguous()) if len(used) else None)
    return out

"""LoRA files: the diffusers/PEFT layout and the kohya layout (A1111, ComfyUI), read, written, applied.

In memory a LoRA is ``{"<prefix>.<module>": (down [r, in], up [out, r])}``, prefix ``unet`` (SD 1/2/XL),
``transformer`` (SD3/SD3.5, Flux.1; diffusers module paths), ``text_encoder`` or ``text_encoder_2``, with the
scale alpha/r already folded into ``up``: the update of a Linear weight is then exactly ``up @ down``,
every file we write means the same thing in every loader, and no alpha metadata can get lost. DoRA, LoHa and
LoKr layers (lycoris.py) sit in the same mapping as records of their own kind, scale folded the same way.

    diffusers: unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight / lora_B.weight
    kohya:     lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
               / .lora_up.weight / .alpha (scalar); text encoder as lora_te_text_model_encoder_layers_0_...
    Flux:      transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight (diffusers) and
               lora_unet_single_blocks_0_linear1.lora_down.weight (kohya, fused q/k/v/mlp; see lora_flux.py)
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ConceptorError
from ..fileio import atomic_path
from . import lora_flux, lycoris
from .embeddings import is_bundle_key
from .metadata import merge_metadata
from .safe_load import load_tensors, refuse_same_file

LoraWeights = dict[str, lycoris.Layer]  # (down, up) for a plain LoRA layer
FORMATS = ("diffusers", "kohya")
PREFIXES = ("unet", "transformer", "text_encoder", "text_encoder_2")
FAMILIES = {"flux": "Flux.1", "sd3": "SD3/SD3.5", "unet": "a UNet model (SD 1.x/2.x/XL)"}
# Top-level transformer modules only Flux has (SD3 embeds patches with a conv and has no guidance embedder).
_FLUX_ONLY = ("single_transformer_blocks.", "x_embedder", "time_text_embed.guidance_embedder.")
_TEXT = ("text_encoder", "text_encoder_2")

# Multi-word names in SD's UNet and CLIP module paths; kohya joins every level with "_", so these are
# glued back together after splitting on "_" (the same table diffusers keeps for its converter).
_COMPOUNDS = ("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
              "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "text_model",
              "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1",
              "layer_norm2", "time_embedding", "linear_1", "linear_2", "add_embedding")


def _module_of(name: str) -> str:
    """Canonical text-encoder paths drop ``text_model.`` (transformers 5 has no such level; 4 has)."""
    return name[len("text_model."):] if name.startswith("text_model.") else name


def _kohya_to_dotted(name: str) -> str:
    dotted = name.replace("_", ".")
    for compound in sorted(_COMPOUNDS, key=len, reverse=True):
        dotted = dotted.replace(compound.replace("_", "."), compound)
    return dotted


def read_lora(path: str | Path) -> LoraWeights:
    """Read a diffusers/PEFT or kohya LoRA file (safetensors; pickles only as plain tensors); the embeddings a
    bundled file also carries (``bundle_emb.*``, see bundle.py) are not part of the LoRA and are left out."""
    data, _ = load_tensors(path)
    return lora_of(data, Path(path).name)  # messages name the file, as the user gave it


def lora_of(data: dict, path: str) -> LoraWeights:
    """The LoRA in a loaded file's contents, ``path`` naming the file in messages."""
    tensors = _tensors_of({k: v for k, v in data.items() if not is_bundle_key(k)}, path)
    if not tensors and any(is_bundle_key(k) for k in data):
        raise ConceptorError(f"{path} holds only bundled embeddings, no LoRA layers; load it as an embedding")
    if not tensors:
        raise ConceptorError(f"{path} holds no tensors; is it a LoRA file?")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in tensors):
        return _from_kohya(tensors, path)
    return _from_diffusers(tensors, path)


def _tensors_of(data: dict, where: str) -> dict[str, torch.Tensor]:
    """The file's tensors by name. A weight or alpha that is not a tensor is named, not skipped: skipping it
    would report a missing pair, which sends the user looking for the wrong thing."""
    out = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConceptorError(f"{where}: key {key!r} (of type {type(key).__name__}) is not a name; a LoRA file "
                                 "maps layer names to tensors")
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif key.endswith((".weight", ".alpha")):
            raise ConceptorError(f"{where}: {key} holds a {type(value).__name__} value, not a tensor; the file is "
                                 "damaged")
    return out


def _from_kohya(tensors: dict[str, torch.Tensor], path) -> LoraWeights:
    out: LoraWeights = {}
    flux = lora_flux.is_kohya_flux(tensors)
    flux_pairs = {}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        up = tensors.get(base + ".lora_up.weight")
        if up is None:
            raise ConceptorError(f"{path}: {base} has lora_down but no lora_up; the file is incomplete")
        if flux and base.startswith("lora_unet_"):
            flux_pairs[base] = _fold(tensors, path, key, base + ".lora_up.weight", base + ".alpha")
            continue
        name = _kohya_name(base)
        if name is None:
            continue
        out[name] = _with_dora(tensors, path, base, "dora_scale",
                               _fold(tensors, path, key, base + ".lora_up.weight", base + ".alpha"))
    if flux_pairs and any(k.endswith(".dora_scale") for k in tensors):
        raise ConceptorError(f"{path}: a DoRA in kohya's Flux layout (fused layers) is not supported; convert it "
                             "to the diffusers layout where it was made")
    out.update(lora_flux.from_kohya_flux(flux_pairs, path))
    for base, kind in lycoris.lycoris_bases(tensors).items():
        name = _kohya_name(base)
        if name is None or flux:
            raise ConceptorError(f"{path}: {base} is a {kind} layer of a model other than SD 1/2/XL; LoHa and LoKr "
                                 "are read for SD 1/2/XL UNets and CLIP text encoders")
        out[name] = lycoris.read_layer(tensors, base, kind, path, lambda t, k: _matrix(t, path, k))
    if not out:
        raise ConceptorError(f"{path} has kohya-style keys but no lora_down/lora_up, LoHa or LoKr layers")
    return out


def _kohya_name(base: str) -> str | None:
    """``unet.<module>`` / ``text_encoder[_2].<module>`` of a kohya SD 1/2/XL layer name (None: another family)."""
    if base.startswith("lora_unet_"):
        return "unet." + _kohya_to_dotted(base[len("lora_unet_"):])
    if base.startswith(("lora_te_", "lora_te1_", "lora_te2_")):
        prefix = "text_encoder_2." if base.startswith("lora_te2_") else "text_encoder."
        return prefix + _module_of(_kohya_to_dotted(base.split("_", 2)[2]))
    return None


def _with_dora(tensors: dict, where: str, base: str, key: str, pair) -> lycoris.Layer:
    """The LoRA pair, or a DoRA layer when ``base.key`` carries its magnitude."""
    magnitude = tensors.get(f"{base}.{key}")
    if magnitude is None:
        return pair
    m = lycoris.dora_magnitude(_matrix(magnitude, where, f"{base}.{key}"), pair[1].shape[0], where, f"{base}.{key}")
    return lycoris.Dora(pair[0], pair[1], m)


_DIFFUSERS_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
                    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))


def _from_diffusers(tensors: dict[str, torch.Tensor], path) -> LoraWeights:
    out: LoraWeights = {}
    for key in tensors:
        for down_suffix, up_suffix in _DIFFUSERS_PAIRS:
            if key.endswith(down_suffix):
                base = key[: -len(down_suffix)]
                up = tensors.get(base + up_suffix)
                if up is None:
                    raise ConceptorError(f"{path}: {base} has a down but no up matrix; the file is incomplete")
                prefix, _, module = base.partition(".")
                if prefix not in PREFIXES:  # bare PEFT keys of a UNet or SD3/Flux transformer adapter
                    bare_transformer = base.startswith(("transformer_blocks.", "single_transformer_blocks."))
                    prefix, module = ("transformer" if bare_transformer else "unet"), base
                if prefix in _TEXT:
                    module = _module_of(module)
                out[f"{prefix}.{module}"] = _with_dora(tensors, path, base, "lora_magnitude_vector",
                                                       _fold(tensors, path, key, base + up_suffix, base + ".alpha"))
    if lycoris.lycoris_bases(tensors):
        raise ConceptorError(f"{path} holds LoHa/LoKr layers under diffusers names, a layout no loader reads; write "
                             "them in the kohya/LyCORIS layout (lora_unet_...)")
    if not out:
        raise ConceptorError(f"{path} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys); "
                             "is it a full checkpoint or an embedding?")
    return out


def _fold(tensors: dict[str, torch.Tensor], where: str, down_key: str, up_key: str,
          alpha_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up * alpha / rank) of one layer; anything odd is named by file and key here, where it enters,
    not later as NaN images or a bad learning rate."""
    down, up = _matrix(tensors[down_key], where, down_key), _matrix(tensors[up_key], where, up_key)
    if down.ndim != 2 or up.ndim != 2:
        raise ConceptorError(f"{where}: {down_key} has shape {tuple(down.shape)} and {up_key.rsplit('.', 2)[-2]} "
                             f"{tuple(up.shape)}; only Linear-layer LoRAs ([rank, in] and [out, rank]) are supported")
    if 0 in down.shape or 0 in up.shape:
        raise ConceptorError(f"{where}: {down_key} has shape {tuple(down.shape)} and {up_key.rsplit('.', 2)[-2]} "
                             f"{tuple(up.shape)}: an empty (rank 0) layer; the file is damaged")
    if up.shape[1] != down.shape[0]:
        raise ConceptorError(f"{where}: LoRA matrices of shapes {tuple(up.shape)} x {tuple(down.shape)} do not "
                             f"chain ({up_key} x {down_key}); the file is damaged")
    alpha = tensors.get(alpha_key)
    if alpha is not None:
        up = up * (_alpha(alpha, where, alpha_key) / down.shape[0])
        if not torch.isfinite(up).all():
            raise ConceptorError(f"{where}: {alpha_key} is {float(alpha.reshape(())):g}, which overflows "
                                 f"{up_key}; the file is damaged")
    return down.contiguous(), up.contiguous()


def _matrix(t: torch.Tensor, where: str, key: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise ConceptorError(f"{where}: {key} has dtype {t.dtype}; LoRA weights are floating point")
    if t.layout != torch.strided:
        raise ConceptorError(f"{where}: {key} is a {t.layout} tensor; LoRA weights are plain dense tensors")
    t = t.detach().float()
    if not torch.isfinite(t).all():
        raise ConceptorError(f"{where}: {key} holds NaN/inf; the file is damaged")
    return t


_alpha = lycoris.check_alpha  # one rule for alpha in every kind


def write_lora(lora: LoraWeights, path: str | Path, to: str = "diffusers", metadata: dict | None = None) -> Path:
    """Write atomically in ``to`` layout; the diffusers one is what ``pipe.load_lora_weights`` expects.
    ``metadata`` (see metadata.build_metadata) joins the header."""
    if to not in FORMATS:
        raise ConceptorError(f"unknown LoRA format {to!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if path.suffix.lower() != ".safetensors":  # the bytes must match the name: no tool reads a LoRA pickle of ours
        raise ConceptorError(f"{path.name}: LoRA files are written as .safetensors (what diffusers, kohya, A1111 "
                             f"and ComfyUI load); name it {path.stem}.safetensors")
    tensors = lora_tensors(lora, to, path.name)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=merge_metadata({"format": "pt"}, metadata))
    return path


def lora_tensors(lora: LoraWeights, to: str, where: str) -> dict[str, torch.Tensor]:
    """The tensors ``write_lora`` writes in ``to`` layout (contiguous), ``where`` naming the file in messages;
    bundle.py adds its embeddings to the kohya ones."""
    family = lora_family(lora)
    kinds = {lycoris.kind_of(layer) for layer in lora.values()}
    pairs = dict(lora)
    if to == "diffusers" and not kinds <= set(lycoris.DIFFUSERS_KINDS):
        names = "/".join(sorted({"loha": "LoHa", "lokr": "LoKr"}[k] for k in kinds - {"lora", "dora"}))
        raise ConceptorError(f"{where}: diffusers loads no {names} "
                             "file; write it with --to kohya (the LyCORIS layout A1111, Forge and ComfyUI load)")
    if to == "kohya" and family == "sd3":
        raise ConceptorError(f"{where}: kohya has no SD3 LoRA layout that diffusers reads; write it with "
                             "--to diffusers (the layout SD3 loaders read)")
    if to == "kohya" and family == "flux":
        if any(n.startswith("text_encoder_2.") for n in lora):
            raise ConceptorError(f"{where}: this Flux LoRA trains T5 (text_encoder_2), which kohya's Flux layout "
                                 "does not carry for diffusers; write it with --to diffusers")
        if kinds != {"lora"}:
            raise ConceptorError(f"{where}: kohya's Flux layout fuses layers, which only a plain LoRA survives; "
                                 "write this DoRA with --to diffusers")
        transformer = {n: p for n, p in lora.items() if n.startswith("transformer.")}
        pairs = {n: p for n, p in lora.items() if n not in transformer} | lora_flux.to_kohya_flux(transformer)
    tensors: dict[str, torch.Tensor] = {}
    numbered = family == "flux" or any(n.startswith("text_encoder_2.") for n in lora)
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if numbered else "lora_te_",
                    "text_encoder_2": "lora_te2_"}  # kohya numbers SDXL's two encoders, and Flux's CLIP-L te1
    for name, layer in pairs.items():
        if name.startswith("lora_unet_"):  # already a kohya Flux layer
            prefix, module = "", name
        else:
            prefix, _, module = name.partition(".")
        if prefix in _TEXT and not (family == "flux" and prefix == "text_encoder_2"):  # Flux's is T5, not CLIP
            # Text-encoder paths with CLIP's "text_model." level: what kohya/A1111 use, what older
            # transformers have, and what diffusers strips again for models that lack it.
            module = "text_model." + module
        base = f"{prefix}.{module}" if to == "diffusers" else (kohya_prefix[prefix] + module.replace(".", "_")
                                                               if prefix else module)
        if lycoris.kind_of(layer) != "lora":
            tensors.update({f"{base}.{k}": v for k, v in lycoris.layer_keys(layer, to).items()})
        elif to == "diffusers":
            tensors[f"{base}.lora_A.weight"], tensors[f"{base}.lora_B.weight"] = layer
        else:
            down, up = layer
            tensors[f"{base}.lora_down.weight"] = down
            tensors[f"{base}.lora_up.weight"] = up
            tensors[f"{base}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: scale already folded
    return {k: v.contiguous() for k, v in tensors.items()}


def default_layout(lora: LoraWeights) -> str:
    """Where a file of these layers is read most widely: diffusers for LoRA/DoRA, kohya/LyCORIS for LoHa/LoKr."""
    kinds = {lycoris.kind_of(layer) for layer in lora.values()}
    return "diffusers" if kinds <= set(lycoris.DIFFUSERS_KINDS) else "kohya"


def convert_lora(src: str | Path, dst: str | Path, to: str) -> Path:
    refuse_same_file(src, dst)
    return write_lora(read_lora(src), dst, to)


def lora_from_peft(module: torch.nn.Module, prefix: str) -> LoraWeights:
    """The trained adapter layers of a PEFT-injected module (LoRA, DoRA, LoHa or LoKr), scale folded, as fp32
    CPU tensors."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(module)
    scales = {name: layer.scaling["default"] for name, layer in module.named_modules()
              if hasattr(layer, "scaling") and "default" in getattr(layer, "scaling", {})}
    firsts = {".lora_A.weight": "lora", ".hada_w1_a": "loha", ".lokr_w1": "lokr", ".lokr_w1_a": "lokr"}
    out: LoraWeights = {}
    for key in sd:
        for suffix, kind in firsts.items():
            if key.endswith(suffix):
                base = key[: -len(suffix)]
                out[f"{prefix}.{_module_of(base)}"] = lycoris.from_peft(sd, base, scales.get(base, 1.0), kind)
    return out


def lora_family(lora: LoraWeights) -> str:
    """What a LoRA was trained for, from its layer names: "flux", "sd3", "unet" or "text_encoder" (only those).

    A transformer LoRA is "flux" when it names a layer only Flux has (single blocks, x_embedder, guidance
    embedder); otherwise "sd3". Flux's double blocks share SD3's joint-block names, so an "sd3" LoRA may still be
    a Flux one trained on double blocks only: ``require_family`` lets it try a Flux model, where shapes decide.
    """
    prefixes = {name.partition(".")[0] for name in lora}
    if "transformer" in prefixes:
        modules = (name.partition(".")[2] for name in lora if name.startswith("transformer."))
        return "flux" if any(m.startswith(_FLUX_ONLY) for m in modules) else "sd3"
    return "unet" if "unet" in prefixes else "text_encoder"


def model_family(modules: dict[str, torch.nn.Module | None]) -> str | None:
    """"flux", "sd3" or "unet" for the denoiser among ``modules`` (None when there is none)."""
    if modules.get("transformer") is not None:
        return "flux" if hasattr(modules["transformer"], "single_transformer_blocks") else "sd3"
    return "unet" if modules.get("unet") is not None else None


def require_family(lora: LoraWeights, family: str | None) -> None:
    """Refuse, in one line, a LoRA trained for another model family than ``family`` ("flux", "sd3", "unet")."""
    trained = lora_family(lora)
    if family is None or trained in (family, "text_encoder") or (trained, family) == ("sd3", "flux"):
        return
    raise ConceptorError(f"this LoRA was trained for {FAMILIES[trained]} but the model is {FAMILIES[family]}; "
                         "use a LoRA trained for this model family")


@torch.no_grad()
def apply_lora_to(lora: LoraWeights, modules: dict[str, torch.nn.Module | None], scale: float = 1.0) -> int:
    """Merge ``scale`` times each layer's update (``up @ down`` for a LoRA; lycoris.delta for DoRA, LoHa, LoKr)
    into the Linear weights it names; returns how many layers changed.

    ``modules`` maps each prefix ("unet" or "transformer", "text_encoder", "text_encoder_2") to its module.
    Merged weights cost nothing at sampling time, and several LoRAs simply add up. A LoRA of another family,
    or one whose layers are missing or of another shape, changes nothing and raises one line.
    """
    require_family(lora, model_family(modules))
    named = {prefix: ({_module_of(n) if prefix in _TEXT else n: m for n, m in module.named_modules()}
                      if module is not None else {}) for prefix, module in modules.items()}
    found, missing = [], []
    for name, adapter in lora.items():
        prefix, _, path = name.partition(".")
        layer = named.get(prefix, {}).get(path)
        if layer is None or not hasattr(layer, "weight") or tuple(layer.weight.shape) != lycoris.shape_of(adapter):
            missing.append(name)
        else:
            found.append((layer, adapter))
    if missing:
        raise ConceptorError(f"LoRA does not fit this model: {len(missing)} of {len(lora)} layers missing or of "
                             f"another shape (first: {missing[0]}); was it trained for another model family?")
    for layer, adapter in found:
        adapter = lycoris.to(adapter, device=layer.weight.device, dtype=torch.float32)
        # DoRA's update depends on the weight it lands on (here: after any LoRA merged before it); the scale
        # multiplies the whole update, as A1111 and ComfyUI apply a DoRA's strength
        layer.weight += (lycoris.delta(adapter, layer.weight) * scale).to(layer.weight.dtype)
    return len(lora)


def apply_lora(lora: LoraWeights, unet: torch.nn.Module, text_encoder: torch.nn.Module | None, scale: float = 1.0,
               text_encoder_2: torch.nn.Module | None = None) -> int:
    """``apply_lora_to`` for an SD 1/2/XL model (UNet and one or two CLIP text encoders)."""
    return apply_lora_to(lora, {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}, scale)

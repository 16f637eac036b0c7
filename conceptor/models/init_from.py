"""Start training from an existing LoRA or textual-inversion embedding instead of a fresh init.

A LoRA file is copied into the PEFT adapters the run has already injected (so the optimizer, checkpoints and
saving stay exactly as for a fresh run); an embedding file becomes the initial vectors the caller hands to
``add_tokens``. Every mismatch (rank, family, layers, widths) is refused up front, in one line, before any
weight changes: a half-loaded init would train silently from something the user never asked for.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ConceptorError
from ..formats import lycoris
from ..formats.embeddings import SDXL_DIFFUSERS_FILES, Embedding, read_embedding
from ..formats.lora import lora_from_peft, model_family, read_lora, require_family

log = logging.getLogger("conceptor")

# Components.family -> the LoRA family names of formats.lora (SD 1/2/XL share the UNet layer names).
_LORA_FAMILY = {"sd1": "unet", "sd2": "unet", "sdxl": "unet", "flux-schnell": "flux"}
_TEXT = ("text_encoder", "text_encoder_2")


def _peft_layers(module: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    """``{lora name: PEFT LoRA layer}`` under the names lora_from_peft (and so read_lora) uses for them.

    lora_from_peft names a layer ``prefix.<module path>``, minus CLIP's ``text_model.`` level; its names are
    the reference, and the module path of each is recovered from the PEFT layers that carry a default adapter.
    """
    by_name = {}
    for path, layer in module.named_modules():
        if any("default" in getattr(layer, first, {}) for first in ("lora_A", "hada_w1_a", "lokr_w1", "lokr_w1_a")):
            plain = path[len("text_model."):] if prefix in _TEXT and path.startswith("text_model.") else path
            by_name[f"{prefix}.{plain}"] = layer
    if not by_name:  # no adapter injected: lora_from_peft would fail on the missing peft_config
        return by_name
    names = set(lora_from_peft(module, prefix))
    if names != set(by_name):  # a PEFT or lora_from_peft naming change must fail loudly, not load nothing
        odd = sorted(names ^ set(by_name))[0]
        raise ConceptorError(f"cannot match this run's LoRA layers to file names (first: {odd}); the installed "
                             "peft names layers differently than conceptor expects: report it with `pip list`")
    return by_name


def _kind(layer: torch.nn.Module) -> str:
    if "default" in getattr(layer, "hada_w1_a", {}):
        return "loha"
    if any("default" in getattr(layer, k, {}) for k in ("lokr_w1", "lokr_w1_a")):
        return "lokr"
    return "dora" if "default" in getattr(layer, "lora_magnitude_vector", {}) else "lora"


def _peft_param(layer: torch.nn.Module, suffix: str) -> torch.Tensor | None:
    """The run's parameter behind a peft state-dict suffix (``lora_A.weight``, ``hada_w1_a`` ...), or None."""
    attr, _, sub = suffix.partition(".")
    holder = getattr(layer, attr, {})
    if "default" not in holder:
        return None
    value = holder["default"]
    if attr == "lora_magnitude_vector":  # a DoraLinearLayer holding the norms as .weight
        return value.weight
    return getattr(value, sub) if sub else value


def _model_layers(module: torch.nn.Module, prefix: str) -> set[str]:
    """Every module path of the model under LoRA names: tells "not targeted" apart from "not in this model"."""
    paths = {p for p, _ in module.named_modules()}
    if prefix in _TEXT:
        paths |= {p[len("text_model."):] for p in paths if p.startswith("text_model.")}
    return {f"{prefix}.{p}" for p in paths}


def init_lora_from(modules: dict[str, torch.nn.Module], path: str | Path, family: str | None) -> int:
    """Copy the LoRA in ``path`` into the freshly injected PEFT adapters of ``modules`` and return how many
    layers it set.

    ``modules`` is what ``add_adapters`` took: ``{"unet"|"transformer": m, "text_encoder": m, ...}``. read_lora
    folds the file's alpha/rank into ``up``, so its update is ``up @ down``; PEFT computes ``B @ A * scaling``
    (lora_alpha / r of this run), hence ``A = down`` and ``B = up / scaling``: the module then computes exactly
    what the file means, whatever alpha either side used. Run layers the file lacks keep their fresh init.
    """
    name = Path(path).name
    lora = read_lora(path)
    modules = {k: m for k, m in modules.items() if m is not None}
    family = _LORA_FAMILY.get(family, family) if family is not None else model_family(modules)
    try:
        require_family(lora, family)
    except ConceptorError as e:
        raise ConceptorError(f"{name}: {e}") from None
    layers = {n: layer for prefix, m in modules.items() for n, layer in _peft_layers(m, prefix).items()}
    if not layers:
        raise ConceptorError(f"this run trains no LoRA, so {name} has nothing to initialise: enable --lora")
    if not any(n in layers for n in lora):
        raise ConceptorError(f"{name} has none of the {len(layers)} layers this run's LoRA trains (it has e.g. "
                             f"{next(iter(lora))}): it was made for another model or other --lora-targets")
    pairs = []
    for layer_name, adapter in lora.items():
        prefix = layer_name.partition(".")[0]
        layer = layers.get(layer_name)
        if layer is None:
            if prefix in _TEXT and prefix not in modules:
                raise ConceptorError(f"{name} trains the text encoder too ({layer_name}) but this run's LoRA "
                                     "covers the denoiser only: add --lora-text-encoder")
            if prefix in modules and layer_name in _model_layers(modules[prefix], prefix):
                raise ConceptorError(f"{name} trains {layer_name} which this run's LoRA does not cover: match "
                                     "--lora-targets / --lora-text-encoder")
            raise ConceptorError(f"{name} trains {layer_name}, which this model does not have: it was made for "
                                 "another model")
        run_kind, file_kind = _kind(layer), lycoris.kind_of(adapter)
        if run_kind != file_kind:
            raise ConceptorError(f"{name} is a {file_kind} file but this run trains a {run_kind}: pass --adapter "
                                 f"{file_kind}")
        values = lycoris.peft_values(adapter, layer.scaling["default"])
        params = {suffix: _peft_param(layer, suffix) for suffix in values}
        if any(p is None for p in params.values()):  # a LoKr half full in the file, factored in the run (or back)
            raise ConceptorError(f"{name}: {layer_name} is factored otherwise than this run's {run_kind}: match "
                                 "--rank, --lokr-factor and --lokr-decompose-both to the file's")
        for suffix, value in values.items():
            if value.shape != params[suffix].shape:
                if suffix in ("lora_A.weight", "hada_w1_b") and value.shape[0] != params[suffix].shape[0]:
                    raise ConceptorError(f"{name} has rank {value.shape[0]} but this run trains rank "
                                         f"{params[suffix].shape[0]}: pass --rank {value.shape[0]}")
                raise ConceptorError(f"{name}: {layer_name} ({suffix}) is {tuple(value.shape)} but this run's is "
                                     f"{tuple(params[suffix].shape)}: it was made for another model or shape")
        pairs.append([(params[suffix], value) for suffix, value in values.items()])
    with torch.no_grad():  # only now, every layer checked: nothing is half-loaded on an error
        for layer_values in pairs:
            for param, value in layer_values:
                param.copy_(value.to(param.device, param.dtype))
    fresh = len(layers) - len(pairs)
    log.info("LoRA init from %s: %d layers loaded%s", name, len(pairs),
             f", {fresh} layers of this run not in it start fresh" if fresh else "")
    return len(pairs)


def _read_any_embedding(path: Path, token: str | None) -> Embedding:
    """read_embedding, plus diffusers' SDXL form: a folder holding learned_embeds{,_2}.safetensors."""
    if path.is_dir():
        files = [path / f for f in SDXL_DIFFUSERS_FILES]
        if not all(f.is_file() for f in files):
            raise ConceptorError(f"{path.name} is a folder without {' and '.join(SDXL_DIFFUSERS_FILES)}; give the "
                                 "embedding file itself")
        first, second = read_embedding(files[0], token), read_embedding(files[1], token)
        if first.num_vectors != second.num_vectors:
            raise ConceptorError(f"{path.name}: its two files hold {first.num_vectors} and {second.num_vectors} "
                                 "vectors; an SDXL embedding has as many for each text encoder")
        return Embedding(first.token, first.vectors, second.vectors)
    if not path.exists():
        raise ConceptorError(f"{path} does not exist; give the path of an embedding file")
    return read_embedding(path, token)


def init_embedding_from(path: str | Path, token: str | None, clips: list[tuple]) -> tuple[str, list[torch.Tensor]]:
    """``(token, [vectors for each CLIP encoder])`` of the embedding in ``path``, checked against ``clips``
    (``Components.clip_encoders``): as many parts as encoders, each as wide as its encoder's token embedding.

    ``token`` overrides the file's name. The vectors are float32 CPU tensors, ready for ``add_tokens``.
    """
    path = Path(path)
    emb = _read_any_embedding(path, token)
    parts = [emb.vectors] if emb.vectors_2 is None else [emb.vectors, emb.vectors_2]
    if len(parts) != len(clips):
        held = "one text encoder (SD 1.x/2.x)" if len(parts) == 1 else "two text encoders (SDXL clip_l + clip_g)"
        raise ConceptorError(f"{path.name} holds vectors for {held} but this model has {len(clips)} CLIP text "
                             "encoder(s): it was trained for another model family")
    for i, (vectors, (_, text_encoder)) in enumerate(zip(parts, clips)):
        width = text_encoder.get_input_embeddings().embedding_dim
        if vectors.shape[1] != width:
            which = "text encoder" if len(clips) == 1 else f"text encoder {i + 1}"
            raise ConceptorError(f"{path.name} is {vectors.shape[1]} wide but this model's {which} is {width}: "
                                 "it was trained for another model family")
    return emb.token, [v.detach().float().cpu().contiguous() for v in parts]

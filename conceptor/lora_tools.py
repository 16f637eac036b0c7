"""Adapter files as tools: merge them into a model, change their rank, extract one from a fine-tune.

Each returns the relative error it introduces (cli/lora.py prints it), so a rank or dtype is chosen by a number.
Applications of the api (model loading, the LoRA spec parser), as eval/ is: one layer above it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from .api import parse_lora_arg
from .config import ModelConfig
from .errors import ConceptorError
from .models.load import resolve_model

MERGE_MARK = "conceptor-merge.json"  # marks a folder `lora merge` wrote, which a later merge may replace
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CLIP_LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # attention and MLP


class LoraToolResult:
    """What a LoRA tool did: ``stats`` (formats.lora_ops.LowRank: kept energy, relative error) and, per tool,
    the layers written, the merged files or the layers left out."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def merge_loras(model: str, loras: Sequence[str | Path], output: str | Path, *, single_file: bool = False,
                dtype: str = "fp32", model_config: str | None = None, family: str | None = None) -> LoraToolResult:
    """Merge LoRA files (``FILE[:SCALE]``, any kind and layout) into ``model`` and write it as a diffusers pipeline
    folder (plus one LDM ``model.safetensors`` with ``single_file``). ``relative_error`` is
    ||W_saved - W_exact||_F / ||W_exact - W_base||_F over the changed layers: what saving in ``dtype`` costs."""
    from .formats.lora import apply_lora_to, lora_family, read_lora
    from .formats.lora_ops import layers_by_name
    from .models.adapters import trainable_text_encoders
    from .models.save import save_pipeline

    if dtype not in SAVE_DTYPES:
        raise ConceptorError(f"unknown --dtype {dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    if not loras:
        raise ConceptorError("no LoRA given; name at least one FILE[:SCALE] to merge")
    parsed = [parse_lora_arg(str(x)) for x in loras]
    out = Path(output)
    _check_merge_output(out, model, [p for p, _ in parsed])
    read = [(p, s, read_lora(p)) for p, s in parsed]  # every file read and checked before the model loads
    by_family = {}
    for p, _, lora in read:
        by_family.setdefault(lora_family(lora), []).append(p.name)
    by_family.pop("text_encoder", None)  # text-encoder-only LoRAs fit any family with that encoder
    if len(by_family) > 1:
        names = "; ".join(f"{', '.join(f)} for {k}" for k, f in by_family.items())
        raise ConceptorError(f"these LoRAs were trained for different model families ({names}); merge only LoRAs "
                             "of the model's family")
    cfg = ModelConfig(model=model, model_config=model_config, family=family)
    c = resolve_model(cfg)
    if single_file and c.unet is None:
        raise ConceptorError(f"--save-single-file writes SD 1/2/XL checkpoints; this model is {c.family}, whose "
                             "merged pipeline folder is written without it")
    modules = {c.denoiser_name: c.denoiser, **trainable_text_encoders(c)}
    layers = layers_by_name({n: None for _, _, lora in read for n in lora}, modules)
    with torch.no_grad():
        base = {n: m.weight.detach().float().clone() for n, m in layers.items()}
        merged = []
        for p, scale, lora in read:
            try:
                merged.append((p.name, scale, apply_lora_to(lora, modules, scale)))
            except ConceptorError as e:  # which file does not fit, not only that one does not
                raise ConceptorError(f"{p.name}: {e}") from None
        num = den = 0.0
        for n, m in layers.items():
            exact = m.weight.detach().float()
            num += float((exact.to(SAVE_DTYPES[dtype]).float() - exact).double().pow(2).sum())
            den += float((exact - base[n]).double().pow(2).sum())
        del base
        # the VAE stays fp32: SDXL's overflows to NaN (black images) in fp16, and no LoRA changes it
        for m in modules.values():
            m.to(SAVE_DTYPES[dtype])
    error = 0.0 if den == 0 else (num / den) ** 0.5
    from .fileio import atomic_dir

    with atomic_dir(out) as tmp:
        save_pipeline(c, tmp, cfg, text_trained=True, single_file=single_file)
        record = {"merged": [{"lora": name, "scale": s, "layers": k} for name, s, k in merged], "dtype": dtype,
                  "relative_error": error}
        (tmp / MERGE_MARK).write_text(json.dumps(record, indent=2) + "\n")
    return LoraToolResult(merged=merged, layers=len(layers), relative_error=error, dtype=dtype, output=out,
                          family=c.family)


def _check_merge_output(out: Path, model: str, loras: list[Path]) -> None:
    """The merged model goes to a new folder: never the model itself, a folder inside it or holding it, nor a
    folder of the user's (only an empty one or one an earlier merge wrote is replaced)."""
    if out.exists() and not out.is_dir():
        raise ConceptorError(f"--output {out} exists and is not a folder; the merged model is a pipeline folder")
    where = out.resolve()
    src = Path(model).expanduser()
    if src.exists():
        src = src.resolve()
        if where == src or src in where.parents or where in src.parents:
            raise ConceptorError(f"--output {out} is the model {model}, inside it or holds it; write the merged "
                                 "model to a new folder (the model is never replaced)")
    for p in loras:
        if where in p.resolve().parents:
            raise ConceptorError(f"--output {out} holds the LoRA {p}, which writing it would delete; choose "
                                 "another folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MERGE_MARK).is_file():
        raise ConceptorError(f"--output {out} exists, is not empty and is not an earlier merge output; choose a new "
                             "or empty folder")


def resize_lora(src: str | Path, dst: str | Path, rank: int, to: str | None = None) -> LoraToolResult:
    """Truncate every layer of a LoRA file to ``rank`` by SVD (lora_ops.resize) and write it; ``to`` None keeps
    the input's layout (kohya stays kohya)."""
    from .formats import lycoris
    from .formats.lora import FORMATS, default_layout, lora_of, write_lora
    from .formats.lora_ops import file_rank, resize
    from .formats.safe_load import load_tensors, refuse_same_file

    _check_tool_args(rank, to, FORMATS)
    refuse_same_file(src, dst)
    data, metadata = load_tensors(src)
    name = Path(src).name
    lora = lora_of(data, name)
    top = file_rank(lora)
    if rank > top:
        raise ConceptorError(f"--rank {rank} is above {name}'s rank {top}; resizing up adds only zeros: give "
                             f"--rank {top} or less")
    resized, stats = resize(lora, rank)
    kohya = any(isinstance(k, str) and k.startswith(("lora_unet_", "lora_te")) for k in data)
    layout = to or ("kohya" if kohya else default_layout(resized))
    # kohya's training notes stay; its network size and kind no longer describe the file
    kept = {k: v for k, v in metadata.items() if not k.startswith("ss_network_") and k != "format"}
    write_lora(resized, dst, layout, metadata=kept)
    converted = any(lycoris.kind_of(layer) in ("loha", "lokr") for layer in lora.values())
    return LoraToolResult(lora=resized, stats=stats, layout=layout, rank=rank, input_rank=top, converted=converted)


def _check_tool_args(rank: int, to: str | None, formats) -> None:
    if rank < 1:
        raise ConceptorError(f"--rank {rank}: a rank is a whole number of at least 1")
    if to is not None and to not in formats:
        raise ConceptorError(f"unknown LoRA layout {to!r}; choose one of {', '.join(formats)}")


def extract_lora(tuned: str, base: str, dst: str | Path, rank: int, *, to: str = "diffusers",
                 text_encoder: bool = True, model_config: str | None = None) -> LoraToolResult:
    """A rank-``rank`` LoRA of ``tuned - base`` (two models of one family): truncated SVD of each changed Linear
    of the denoiser's attention/feed-forward and, with ``text_encoder``, of the CLIP encoders' attention/MLP.
    ``not_captured``: the share (in Frobenius norm) of the whole weight difference outside those layers (convs,
    norms, biases), which no LoRA of Linear layers can carry."""
    from .formats.lora import FORMATS, write_lora
    from .formats.lora_ops import LowRank, linear_layers, low_rank_of, module_path
    from .models.adapters import UNET_LORA_TARGETS, trainable_text_encoders

    _check_tool_args(rank, to, FORMATS)
    from .formats.safe_load import refuse_same_file

    for model in (tuned, base):
        refuse_same_file(model, dst)
    dst = Path(dst)
    if dst.suffix.lower() != ".safetensors":  # before two models load, not after
        raise ConceptorError(f"{dst.name}: LoRA files are written as .safetensors; name it {dst.stem}.safetensors")
    t, b = (resolve_model(ModelConfig(model=m, model_config=model_config)) for m in (tuned, base))
    if t.family != b.family:
        raise ConceptorError(f"{tuned} is a {t.family} model but {base} is {b.family}; extract from a fine-tune "
                             "and the base it was tuned from")
    targets = {"unet": UNET_LORA_TARGETS["attn-ff"], "text_encoder": CLIP_LINEAR_TARGETS,
               "text_encoder_2": CLIP_LINEAR_TARGETS}
    if t.transformer is not None:
        targets["transformer"] = t.flow.targets(t.transformer, "attn-ff")

    def modules(c):
        return {c.denoiser_name: c.denoiser, **(trainable_text_encoders(c) if text_encoder else {})}

    mt, mb = modules(t), modules(b)
    lt, lb = linear_layers(mt, targets), linear_layers(mb, targets)
    odd = next((n for n in lt.keys() | lb.keys() if n not in lt or n not in lb
                or lt[n].weight.shape != lb[n].weight.shape), None)
    if odd is not None:
        raise ConceptorError(f"{tuned} and {base} differ in shape (first: {odd}); extract from a fine-tune and the "
                             "base it was tuned from")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the SVDs are the cost; a GPU does them in seconds
    lora, stats, unchanged = {}, LowRank(), 0
    with torch.no_grad():
        for n in sorted(lt):
            wb = lb[n].weight.detach().to(device, torch.float64)
            diff = lt[n].weight.detach().to(device, torch.float64) - wb
            if float(diff.norm()) <= 1e-7 * float(wb.norm()):  # unchanged (or changed below fp32 rounding)
                unchanged += 1
                continue
            lora[n] = low_rank_of(diff, rank, stats)
        if not lora:
            raise ConceptorError(f"{tuned} and {base} have the same weights in every attention/feed-forward layer"
                                 f"{'' if text_encoder else ' of the denoiser'}; there is nothing to extract")
        whole = 0.0
        for prefix in mt:
            params_b = {module_path(prefix, k): v for k, v in mb[prefix].named_parameters()}
            for k, v in mt[prefix].named_parameters():
                other = params_b.get(module_path(prefix, k))
                if other is not None and other.shape == v.shape:
                    whole += float((v.double() - other.double()).pow(2).sum())
    captured = stats.total_sq  # sum of every extracted difference's squared norm, before truncation
    not_captured = (max(whole - captured, 0.0) / whole) ** 0.5 if whole else 0.0
    write_lora(lora, dst, to)
    return LoraToolResult(lora=lora, stats=stats, unchanged=unchanged, not_captured=not_captured, layout=to,
                          rank=rank, family=t.family)

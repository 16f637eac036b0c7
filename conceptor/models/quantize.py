"""Quantized frozen bases for LoRA (QLoRA, Dettmers et al. 2023): the transformer's Linear weights stored in
4-bit NormalFloat (nf4) or LLM.int8 (Dettmers et al. 2022) through bitsandbytes, or float8 e4m3 with one scale
per output row through optimum-quanto (as ai-toolkit and SimpleTuner train Flux LoRAs). The LoRA on top stays
fp32 and trains as usual: peft wraps bitsandbytes layers in its own LoRA classes, and quanto's QLinear is a
Linear.

Why layer by layer rather than diffusers' ``from_pretrained(quantization_config=BitsAndBytesConfig(...))``:
that path refuses to run without a CUDA GPU, and it needs the checkpoint on disk; this one quantizes a
model already in memory, on any device bitsandbytes supports (bitsandbytes 0.50.2 quantizes and runs nf4 and
int8 on the CPU), one layer at a time, so the unquantized model never has to fit on the GPU.
"""
from __future__ import annotations

from importlib import metadata

import torch

from ..errors import ConceptorError

MODES = ("nf4", "int8", "fp8")
PACKAGES = {"nf4": "bitsandbytes", "int8": "bitsandbytes", "fp8": "optimum-quanto"}
TESTED = {"bitsandbytes": "0.50.2", "optimum-quanto": "0.2.7"}  # what quantized and trained on the CPU here
# Embedders and the output projection see each token once and hold under 2% of the weights; quantizing them
# costs quality for no memory (diffusers keeps such modules unquantized too). Matched on the first name part,
# so the single blocks' own ``proj_out`` is quantized.
KEEP = ("x_embedder", "context_embedder", "time_text_embed", "pos_embed", "proj_out", "norm_out")


def _bnb_linear(linear: torch.nn.Linear, mode: str, compute_dtype: torch.dtype, device) -> torch.nn.Module:
    import bitsandbytes as bnb

    bias = linear.bias is not None
    weight = linear.weight.data
    if mode == "nf4":
        # compress_statistics: the per-64 absmax constants are themselves quantized (QLoRA's double quantization)
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=q)
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                threshold=6.0, device="meta")
        # Int8Params quantizes only on a move away from the CPU, so its float weight starts there
        q.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    if bias:
        q.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return q.to(device)  # moving an unquantized bitsandbytes weight to a device quantizes it there


def _fp8_linear(linear: torch.nn.Linear, compute_dtype: torch.dtype, device) -> torch.nn.Module:
    from optimum.quanto import qfloat8
    from optimum.quanto.nn import QLinear

    q = QLinear.from_module(linear.to(device=device, dtype=compute_dtype), weights=qfloat8)
    q.freeze()  # replaces the float weight by its float8 form; until then quanto keeps both
    return q.requires_grad_(False)


def _check_package(mode: str) -> None:
    package = PACKAGES[mode]
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        raise ConceptorError(f"--quantize {mode} needs {package}: pip install '{package}>={TESTED[package]}'") from None


def quantize_base(module: torch.nn.Module, mode: str, *, compute_dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, keep: tuple[str, ...] = KEEP) -> int:
    """Replace the Linear layers of ``module`` (a frozen transformer) in place by ``mode`` ("nf4", "int8",
    "fp8") quantized ones, each quantized on ``device`` (default: where its weight is). Call it before adding
    LoRA adapters. Layers under ``keep`` (first name part) stay as they are. Freezes the whole module and
    returns how many layers were quantized; non-quantized parameters move to ``device`` too."""
    if mode not in MODES:
        raise ConceptorError(f"--quantize {mode}: choose one of {', '.join(MODES)}")
    if any("lora_" in name for name, _ in module.named_parameters()):
        raise ConceptorError("quantize the base model before adding LoRA adapters, not after")
    _check_package(mode)
    first = next((p for p in module.parameters() if p.is_floating_point()), None)
    compute_dtype = compute_dtype or (first.dtype if first is not None else torch.bfloat16)
    module.requires_grad_(False)
    targets = [(name, m) for name, m in module.named_modules()
               if type(m) is torch.nn.Linear and name.split(".")[0] not in keep]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        target = torch.device(device) if device is not None else linear.weight.device
        try:
            q = _fp8_linear(linear, compute_dtype, target) if mode == "fp8" else _bnb_linear(linear, mode,
                                                                                            compute_dtype, target)
        except (RuntimeError, NotImplementedError) as e:
            package = PACKAGES[mode]
            raise ConceptorError(f"--quantize {mode} failed on {target.type} with {package} "
                                 f"{metadata.version(package)} ({str(e).splitlines()[0]}); use a CUDA GPU or "
                                 f"{package}=={TESTED[package]}") from e
        setattr(parent, child, q)
    if device is not None:
        module.to(device)
    return len(targets)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds any layer ``quantize_base`` made (its weight no longer a plain float tensor)."""
    for m in module.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and type(m) is not torch.nn.Linear and (
                not w.is_floating_point() or type(w) not in (torch.Tensor, torch.nn.Parameter)):
            return True
    return False

"""Before any weights load: the peak GPU memory an SD3/Flux run will need, estimated from the model's configs
on the meta device (training/memory.py), printed, and, when it cannot fit the GPU, a stop naming the flags
that would make it fit. A 24 GB card that runs out of memory after 10 minutes of loading is the most common
complaint with these models; this answers in a second."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import ConceptorError
from . import memory as M

log = logging.getLogger("conceptor")
# model_index.json's pipeline class -> family (families.PIPELINE_FAMILIES, restated: no model code here)
_PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}
_T5 = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}


def _reader(where: str):
    """A function part/config.json -> dict for a local folder or a hub id (from the cache when offline)."""
    folder = Path(where)
    if folder.is_dir():
        return lambda name: json.loads((folder / name).read_text())

    def hub(name: str) -> dict:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(where, name)).read_text())
    return hub


def read_architecture(model: str | None, model_config: str | None) -> tuple[M.Architecture, int] | None:
    """The model's architecture from its configs alone and its default training size in pixels, or None when
    it is not an SD3/Flux model or its configs cannot be read without weights (the run then goes on without
    an estimate)."""
    if model is None:
        return None
    source = model_config if model.lower().endswith(".safetensors") else model
    if source is None:
        return None
    read = _reader(source)
    try:
        index = read("model_index.json")
        family = _PIPELINES.get(index.get("_class_name"))
        if family is None:
            return None
        # The encoders that sit on the GPU in a run: the CLIP ones (T5 stays in CPU memory, see loop.py).
        clips = tuple(read(f"{part}/config.json") for part in ("text_encoder", "text_encoder_2")
                      if index.get(part, [None])[0] and part != _T5[family])
        transformer = read("transformer/config.json")
        try:  # the model's own size (conceptor.json), else its config's (SD3), else the pipelines' 1024
            side = int(read("conceptor.json")["resolution"])
        except Exception:
            side = int(transformer.get("sample_size") or 128) * 8
        return M.Architecture(family, transformer, clips, read("vae/config.json")), side
    except Exception as e:  # offline and not cached, a damaged folder: the loader reports it in its own words
        log.debug("no memory estimate: %s", e)
        return None


def plan_of(cfg: RunConfig, arch: M.Architecture, default_side: int = 1024) -> M.TrainingPlan:
    """The run's memory-relevant choices. Latents are always cached (the VAE encoder never runs in a step, but
    stays resident); text is encoded in every step only where an encoder trains (textual inversion, text LoRA)."""
    t, lora = cfg.train, cfg.lora
    lora_on = lora is not None and lora.enabled
    side = cfg.data.resolution or default_side
    family = arch.family
    targets = None
    if lora_on:
        from ..families import FAMILIES

        targets = tuple(FAMILIES[family].lora_targets[lora.targets])
    training = "lora" if lora_on or cfg.method == "textual-inversion" else "full"
    return M.TrainingPlan(
        dtype={"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[t.mixed_precision], quantize=t.quantize,
        training=training, rank=lora.rank if lora_on else 1, targets=targets if lora_on else ("__none__",),
        batch_size=t.batch_size * (2 if getattr(cfg.options, "class_prompt", None) else 1), resolution=side,
        gradient_checkpointing=t.gradient_checkpointing, cache_text=False, cache_latents=False,
        optimizer="adamw8bit" if cfg.optim.use_8bit_adam else cfg.optim.optimizer)


def gpu_budget() -> float | None:
    """Bytes the run may use on the GPU it will train on (None without one: a CPU run is not stopped)."""
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return float(free)


def check_memory(cfg: RunConfig) -> M.MemoryEstimate | None:
    """Print the estimate of an SD3/Flux run and stop it, in one line with the fitting flags, when the GPU is
    too small. Returns the estimate (None for UNet models or unreadable configs)."""
    found = read_architecture(cfg.model.model, cfg.model.model_config)
    if found is None:
        return None
    arch, side = found
    arch = M.Architecture(arch.family, arch.transformer, arch.text_encoders, arch.vae,
                          cfg.model.max_sequence_length)
    plan = plan_of(cfg, arch, side)
    estimate = M.estimate_memory(arch, plan)
    budget = gpu_budget()
    side = max(plan.size)
    log.info("%s", M.format_estimate(estimate, budget, f"estimated peak GPU memory ({arch.family}, {side} px, "
                                                        f"batch {plan.batch_size}, {plan.training}):"))
    if budget is not None and estimate.total > budget:
        fit = M.fit_budget(arch, plan, budget)
        hint = f"add {' '.join(fit.flags)}" if fit.fits else fit.message
        raise ConceptorError(f"this run needs about {estimate.total / M.GB:.1f} GB of GPU memory and "
                             f"{budget / M.GB:.1f} GB are free; {hint}")
    return estimate

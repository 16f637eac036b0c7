"""The metadata every file a run writes carries (issue 23): what A1111/Forge and LoRA managers show (kohya's ss_*
keys, ModelSpec), a fingerprint of the base model, and the resolved config, without a path of this machine unless
--metadata-paths asks for them. formats/metadata.py builds the header; this reads the run for it."""
from __future__ import annotations

import hashlib
import time
from collections import Counter

import torch

from ..config import RunConfig
from ..formats.metadata import build_metadata
from ..models.load import Components

_SAMPLE = 4096  # values per tensor in the base-model fingerprint


def base_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every tensor's name, shape and first 4096 values (fp32): a fine-tune changes them, a 12B model
    is fingerprinted in a second, and adapters are left out (a LoRA run's base stays the base)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if any(k in name for k in ("lora_", "hada_", "lokr_")):  # peft's LoRA/DoRA, LoHa and LoKr parameters
            continue
        h.update(name.replace(".base_layer", "").encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().flatten()[:_SAMPLE].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


class Provenance:
    """Captured at set-up (before any weight trains); ``metadata(...)`` for each file saved."""

    def __init__(self, cfg: RunConfig, components: Components, data=None):
        self.cfg, self.c = cfg, components
        self.started = time.time()
        self.base_hash = base_fingerprint(components.denoiser)
        self.tags = _tag_frequency(data) if data is not None else None

    def metadata(self, kind: str, step: int, final: bool, trigger: str | None = None) -> dict[str, str]:
        cfg, c = self.cfg, self.c
        res = cfg.data.resolution or c.default_resolution
        family = c.family.replace("flux-schnell", "flux")
        lora = cfg.lora if cfg.lora is not None and cfg.lora.enabled else None
        return build_metadata(
            family=family, kind=kind, title=str(cfg.train.output).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1],
            trigger_phrase=trigger, resolution=res, prediction_type=getattr(c, "prediction_type", None),
            base_model=cfg.model.model or "conceptor toy model", base_model_hash=self.base_hash,
            rank=lora.rank if lora else None, alpha=(lora.alpha or lora.rank) if lora else None, steps=step,
            started_at=self.started, finished_at=time.time() if final else None, tag_frequency=self.tags,
            output_name=str(cfg.train.output).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1],
            config=cfg.to_dict(), keep_paths=cfg.train.metadata_paths,
            adapter=lora.adapter if lora else "lora", lokr_factor=lora.lokr_factor if lora else None)


def _tag_frequency(ts) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per subset (its folder's name), how many captions hold each tag."""
    from ..data.dataset import tags

    out: dict[str, Counter] = {}
    for i, it in enumerate(ts.items):
        sub = ts.subset_of(i)
        text = it.caption or sub.class_tokens
        if not text:
            continue
        name = str(sub.image_dir or sub.source or sub.metadata_file or sub.where).replace("\\", "/").rstrip("/")
        out.setdefault(name.rsplit("/", 1)[-1], Counter()).update(set(t for t in tags(text, sub.caption_separator)
                                                                       if t))
    return {k: dict(v) for k, v in out.items()}

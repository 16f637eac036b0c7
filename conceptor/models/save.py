"""Write a trained model as a diffusers pipeline folder (and, on request, one LDM .safetensors + .yaml)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from ..fileio import atomic_dir
from .load import SAMPLING_FILE, Components, resolve_model
from .pipeline import build_pipeline

PARTS = ("unet", "transformer", "text_encoder", "vae", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2",
         "text_encoder_3", "tokenizer_3")


def save_pipeline(c: Components, folder: Path, model_cfg: ModelConfig, text_trained: bool,
                  single_file: bool = False, metadata: dict | None = None) -> list[Path]:
    """Make ``folder`` loadable by ``StableDiffusionPipeline.from_pretrained``.

    All parts are staged in a hidden folder and moved in, ``model_index.json`` last, so a half-written
    folder never looks loadable. Frozen parts that ran in half precision are written from the untouched
    fp32 originals (reloaded), never from their rounded copies.
    """
    vae, te, te2, te3 = c.vae, c.text_encoder, c.text_encoder_2, c.text_encoder_3
    if vae.dtype != torch.float32 or (not text_trained and te.dtype != torch.float32):
        base = resolve_model(model_cfg)
        vae, te3 = base.vae, base.text_encoder_3  # T5 never trains
        te, te2 = (te, te2) if text_trained else (base.text_encoder, base.text_encoder_2)
        if c.family == "flux":  # Flux's second encoder is its T5: frozen, so always the original
            te2 = base.text_encoder_2
    pipe = build_pipeline(c, "euler" if c.is_sdxl or c.flow else "ddim", vae=vae, text_encoder=te,
                          text_encoder_2=te2, text_encoder_3=te3)
    folder = Path(folder)
    staged = folder / ".pipeline"
    with atomic_dir(staged) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # The model's scheduler config as shipped (betas, prediction type): samplers start from it.
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(c.scheduler_config), indent=2))
        if c.sampling:  # the base model's measured sampling defaults hold for its fine-tunes too
            (tmp / SAMPLING_FILE).write_text(json.dumps(c.sampling, indent=2) + "\n")
    written = []
    for part in PARTS:
        if not (staged / part).exists():  # SD 1/2 have no second text encoder
            continue
        target = folder / part
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged / part, target)
        written.append(target)
    if (staged / SAMPLING_FILE).exists():
        os.replace(staged / SAMPLING_FILE, folder / SAMPLING_FILE)
        written.append(folder / SAMPLING_FILE)
    os.replace(staged / "model_index.json", folder / "model_index.json")
    staged.rmdir()
    written.append(folder / "model_index.json")
    if single_file:
        from ..formats.ldm_checkpoint import save_single_file_with_yaml

        written += save_single_file_with_yaml(c.unet, vae, te, folder / "model.safetensors", c.family,
                                              c.prediction_type, c.scheduler_config, text_encoder_2=te2,
                                              metadata=metadata)
    return written

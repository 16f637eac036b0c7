"""Prompt -> UNet conditioning for every family: one text encoder (SD 1/2), or two plus the pooled
embedding and size ids that SDXL's UNet takes as added conditioning."""
from __future__ import annotations

import torch

from .load import Components


def token_ids(c: Components, prompts: list[str]) -> list[torch.Tensor]:
    """Padded ids, one tensor per tokenizer."""
    return [tok(prompts, padding="max_length", truncation=True, max_length=tok.model_max_length,
                return_tensors="pt").input_ids for tok in c.tokenizers]


def encode(c: Components, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states for cross-attention, pooled embedding or None).

    SDXL conditions on the penultimate layer of both encoders, concatenated (768 + 1280 wide), and on the
    projected pooled output of the second, as diffusers' StableDiffusionXLPipeline.encode_prompt does.
    """
    if not c.is_sdxl:
        return c.text_encoder(ids[0].to(c.text_encoder.device))[0], None
    out1 = c.text_encoder(ids[0].to(c.text_encoder.device), output_hidden_states=True)
    out2 = c.text_encoder_2(ids[1].to(c.text_encoder_2.device), output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(out1.hidden_states[-2].dtype)], dim=-1)
    return hidden, out2.text_embeds


def added_conditioning(c: Components, pooled: torch.Tensor | None, resolution: int | tuple[int, int],
                       crop: tuple[int, int] = (0, 0)) -> dict | None:
    """SDXL's ``added_cond_kwargs``: pooled text embedding and (original size, crop top-left, target size)."""
    if pooled is None:
        return None
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    ids = torch.tensor([h, w, crop[0], crop[1], h, w], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": ids.expand(len(pooled), -1)}

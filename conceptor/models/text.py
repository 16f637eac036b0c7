"""Prompt -> denoiser conditioning for every family: one text encoder (SD 1/2), or two plus the pooled
embedding and size ids that SDXL's UNet takes as added conditioning; SD3 and Flux through their family
layer (families/), which knows their CLIP and T5 encoders."""
from __future__ import annotations

import logging

import torch

from ..errors import ConceptorError
from .load import Components

log = logging.getLogger("conceptor")
# Prompts already reported as cut at the encoder's limit: each is reported once, and after a few the rest
# are not checked at all, so a dataset of long captions costs neither a flood of lines nor memory.
_CUT_REPORTED: set[str] = set()
_MAX_CUT_REPORTS = 10


def token_ids(c: Components, prompts: list[str]) -> list[torch.Tensor]:
    """Padded ids, one tensor per tokenizer. A prompt cut at the tokenizer's limit is warned about once."""
    out = []
    for tok, limit in zip(c.tokenizers, max_lengths(c)):
        enc = tok(prompts, padding="max_length", truncation=True, max_length=limit, return_tensors="pt")
        mask = enc.get("attention_mask")
        if mask is not None and len(_CUT_REPORTED) < _MAX_CUT_REPORTS:
            # Only a prompt that fills every slot can have been cut: just those are tokenized again in full.
            _report_cut(tok, [p for p, full in zip(prompts, mask[:, -1].tolist()) if full], limit)
        out.append(enc.input_ids)
    return out


def max_lengths(c: Components) -> list[int]:
    """Token slots of each tokenizer: its own limit (CLIP's 77), or for T5 the family's sequence length."""
    return c.flow.max_lengths(c) if c.flow is not None else [tok.model_max_length for tok in c.tokenizers]


def warn_if_cut(c: Components, prompts: list[str]) -> None:
    """The warning of token_ids, for prompts that another tokenizes (diffusers' pipelines cut silently)."""
    token_ids(c, prompts)


def _report_cut(tok, prompts: list[str], limit: int) -> None:
    for prompt in prompts:
        if prompt in _CUT_REPORTED or len(_CUT_REPORTED) >= _MAX_CUT_REPORTS:
            continue
        ids = tok(prompt, verbose=False).input_ids  # verbose=False: transformers' own too-long warning
        if len(ids) <= limit:
            continue
        _CUT_REPORTED.add(prompt)
        dropped = tok.decode(ids[limit - 1:-1], skip_special_tokens=True)
        log.warning("prompt %r is %d tokens; the text encoder reads %d, so its last %d are ignored: %r%s",
                    prompt if len(prompt) <= 60 else prompt[:57] + "...", len(ids), limit, len(ids) - limit,
                    dropped, "; further cut prompts are not reported" if len(_CUT_REPORTED) == _MAX_CUT_REPORTS
                    else "")


def check_token_fits(c: Components, prompt: str, token: str, vectors: int, source: str) -> None:
    """Refuse a prompt that puts ``token`` (all ``vectors`` of it) past a tokenizer's limit, where truncation
    drops it: no gradient would reach its vectors. Works before the token is added to the vocabulary."""
    if token not in prompt:
        return
    before = prompt.split(token, 1)[0]
    for tok, limit in zip(c.tokenizers, max_lengths(c)):
        # Tokenizers split text on added tokens before anything else, so what precedes the token is
        # tokenized alone either way; the start token is number 1 and the last slot is the end token's.
        first = len(tok(before, add_special_tokens=False, verbose=False).input_ids) + 2
        last = first + vectors - 1
        if last >= limit:
            where = f"token {first}" if vectors == 1 else f"tokens {first}-{last}"
            raise ConceptorError(f"{source} puts {token} at {where}, past the text encoder's {limit}"
                                 "-token limit (start and end tokens included); shorten the text before the token")


def encode(c: Components, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states for cross-attention, pooled embedding or None).

    SDXL conditions on the penultimate layer of both encoders, concatenated (768 + 1280 wide), and on the
    projected pooled output of the second, as diffusers' StableDiffusionXLPipeline.encode_prompt does.
    """
    if c.flow is not None:
        return c.flow.encode(c, ids)
    if not c.is_sdxl:
        return c.text_encoder(ids[0].to(c.text_encoder.device))[0], None
    out1 = c.text_encoder(ids[0].to(c.text_encoder.device), output_hidden_states=True)
    out2 = c.text_encoder_2(ids[1].to(c.text_encoder_2.device), output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(out1.hidden_states[-2].dtype)], dim=-1)
    return hidden, out2.text_embeds


def added_conditioning(c: Components, pooled: torch.Tensor | None, resolution: int | tuple[int, int],
                       crop: tuple[int, int] = (0, 0)) -> dict | None:
    """SDXL's ``added_cond_kwargs``: pooled text embedding and (original size, crop top-left, target size).
    SD3 and Flux take the pooled embedding alone."""
    if c.flow is not None:
        return {"pooled": pooled}
    if pooled is None:
        return None
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    ids = torch.tensor([h, w, crop[0], crop[1], h, w], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": ids.expand(len(pooled), -1)}

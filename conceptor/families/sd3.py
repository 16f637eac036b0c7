"""Stable Diffusion 3 / 3.5 (Esser et al. 2024): an MMDiT over 2x2 patches of 16-channel latents, conditioned
on CLIP-L + CLIP-G (penultimate layers, concatenated, zero-padded to T5's width) followed by T5-XXL tokens,
and on the two CLIP pooled embeddings. Timesteps are sigma * 1000; the training shift is the scheduler's."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as nnf

from ..training import flow as F
from .flow import FlowFamily

_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
         "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


class SD3Family(FlowFamily):
    def max_lengths(self, c) -> list[int]:
        return [77, 77] + ([c.max_sequence_length] if c.tokenizer_3 is not None else [])

    def encode(self, c, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # StableDiffusion3Pipeline.encode_prompt, clip_skip None
        hidden, pooled = [], []
        for te, i in ((c.text_encoder, ids[0]), (c.text_encoder_2, ids[1])):
            out = te(i.to(te.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat([hidden[0], hidden[1].to(hidden[0].dtype)], dim=-1)
        width = c.transformer.config.joint_attention_dim
        if c.text_encoder_3 is not None:
            t5 = c.text_encoder_3(ids[2].to(c.text_encoder_3.device))[0].to(clip.device)  # T5 may sit on the CPU
        else:  # a model shipped without T5 (allowed by the pipeline): zeros in its place, as diffusers does
            t5 = torch.zeros(len(clip), c.max_sequence_length, width, device=clip.device, dtype=clip.dtype)
        clip = nnf.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat([pooled[0], pooled[1].to(pooled[0].dtype)],
                                                                       dim=-1)

    def t5(self, c):
        return c.text_encoder_3

    def predict(self, c, noisy, sigmas, hidden, pooled, guidance):
        return c.transformer(hidden_states=noisy, timestep=sigmas.to(noisy.dtype) * 1000,
                             encoder_hidden_states=hidden, pooled_projections=pooled, return_dict=False)[0]

    def shift(self, c, sigmas, height, width, fixed):
        return F.shift_sigmas(sigmas, fixed if fixed is not None else float(c.scheduler_config.get("shift", 1.0)))


SD3 = SD3Family(name="sd3", pipeline_class="StableDiffusion3Pipeline", title="SD 3/3.5", default_guidance=7.0,
                default_steps=28, lora_targets={"attn": _ATTN, "attn-ff": _ATTN + _FF}, x0_loss=True)

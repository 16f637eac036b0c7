"""Flux.1 (Black Forest Labs 2024): a transformer of double (MMDiT) and single blocks over 2x2-packed
16-channel latents with 3-axis rotary position ids, conditioned on T5-XXL tokens and CLIP-L's pooled
embedding. dev is guidance-distilled (a guidance embedding input); schnell is not. Timesteps are sigmas;
the training shift depends on the number of image tokens, as its sampler's does."""
from __future__ import annotations

from typing import Sequence

import torch

from ..training import flow as F
from .flow import FlowFamily

_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
         "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
# The single blocks' MLP halves; their proj_out is named per block (lora_targets below) because the top-level
# output projection is called proj_out too, and kohya's layout has no place for an adapter there.
_FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"]


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C]: each 2x2 patch one token (FluxPipeline._pack_latents)."""
    b, ch, h, w = latents.shape
    x = latents.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), ch * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack`` for a latent grid of h x w."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Position ids [h/2 * w/2, 3] of the packed tokens: (0, row, column) (FluxPipeline's latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFamily(FlowFamily):
    def max_lengths(self, c) -> list[int]:
        return [77, c.max_sequence_length]

    def encode(self, c, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # FluxPipeline.encode_prompt: CLIP-L's pooled output, T5's last hidden states
        pooled = c.text_encoder(ids[0].to(c.text_encoder.device), output_hidden_states=False).pooler_output
        hidden = c.text_encoder_2(ids[1].to(c.text_encoder_2.device), output_hidden_states=False)[0]
        return hidden.to(pooled.device), pooled  # T5 may sit on the CPU

    def t5(self, c):
        return c.text_encoder_2

    def uses_guidance(self, c) -> bool:
        return bool(c.transformer.config.get("guidance_embeds", False))

    def predict(self, c, noisy, sigmas, hidden, pooled, guidance):
        b, _, h, w = noisy.shape
        g = None if guidance is None else torch.full((b,), float(guidance), device=noisy.device, dtype=noisy.dtype)
        out = c.transformer(hidden_states=pack(noisy), timestep=sigmas.to(noisy.dtype), guidance=g,
                            pooled_projections=pooled, encoder_hidden_states=hidden,
                            txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                            img_ids=image_ids(h, w, noisy.device, noisy.dtype), return_dict=False)[0]
        return unpack(out, h, w)

    def shift(self, c, sigmas, height, width, fixed):
        if fixed is not None:
            return F.shift_sigmas(sigmas, fixed)
        sc = c.scheduler_config
        if not sc.get("use_dynamic_shifting", False):
            return F.shift_sigmas(sigmas, float(sc.get("shift", 1.0)))
        tokens = (height // 16) * (width // 16)
        mu = F.flux_mu(tokens, sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                       sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
        return F.time_shift(mu, sigmas)

    def targets(self, transformer, which: str) -> list[str]:
        names = list(self.lora_targets[which])
        if which == "attn-ff":
            blocks = len(transformer.single_transformer_blocks)
            names += [f"single_transformer_blocks.{i}.proj_out" for i in range(blocks)]
        return names

    def supports_negative(self, c) -> bool:
        # dev's guidance is distilled into an embedding; a model without one (schnell-shaped) can take real
        # classifier-free guidance, which FluxPipeline runs as "true CFG" with negative embeddings
        return not self.uses_guidance(c)

    def guidance_default(self, c) -> float:
        # dev: its embedding's 3.5; schnell: 1 = no CFG pass (it is distilled to sample without one)
        return self.default_guidance if self.uses_guidance(c) else 1.0

    def cfg_kwargs(self, c, guidance: float) -> dict:
        return {"true_cfg_scale": guidance} if not self.uses_guidance(c) and guidance > 1 else {}

    def prepare_latents(self, c, latents):
        return pack(latents)

    def latents_out(self, c, latents, height, width):
        f = c.vae_scale_factor
        return unpack(latents, height // f, width // f)


FLUX = FluxFamily(name="flux", pipeline_class="FluxPipeline", title="Flux.1", default_guidance=3.5,
                  default_steps=28, lora_targets={"attn": _ATTN, "attn-ff": _ATTN + _FF})

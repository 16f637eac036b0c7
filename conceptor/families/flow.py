"""What every flow-matching family shares: loading a diffusers folder part by part, and the training loss.

The loss (Esser et al. 2024; Liu et al. 2022 "Flow Straight and Fast"): noisy = (1 - sigma) x0 + sigma eps,
the transformer predicts the velocity eps - x0, squared error weighted per sample. What differs between
families (text encoders, latent packing, timestep convention, guidance embedding, the sigma shift) is a
method of the family; the maths is training/flow.py.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..training import flow as F
from ..training.diffusion import weighted_mean

# Parts a flow pipeline may have, in the order the pipelines take them.
PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3",
         "transformer", "vae", "scheduler")


@dataclass(frozen=True)
class FlowFamily:
    """A flow-matching model family. Subclasses fill in text encoding, the denoiser call and the pipeline."""

    name: str
    pipeline_class: str
    title: str  # what users call it, for messages
    default_guidance: float
    default_steps: int
    lora_targets: dict  # "attn" | "attn-ff" -> module-name suffixes for peft
    x0_loss: bool = False  # the loss diffusers' scripts for the family use by default (see flow_loss_at)

    def targets(self, transformer, which: str) -> list[str]:
        """peft target names of the LoRA target set ``which`` ("attn" | "attn-ff") on this transformer."""
        return list(self.lora_targets[which])

    # -- text ------------------------------------------------------------------------------------
    def max_lengths(self, c) -> list[int]:
        """Token slots per tokenizer: CLIP's 77, T5's ``c.max_sequence_length``."""
        raise NotImplementedError

    def encode(self, c, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence embeddings for the transformer's text stream, pooled embedding)."""
        raise NotImplementedError

    # -- denoiser --------------------------------------------------------------------------------
    def predict(self, c, noisy: torch.Tensor, sigmas: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor,
                guidance: float | None) -> torch.Tensor:
        """The velocity the transformer predicts for ``noisy`` latents [B, C, h, w] at ``sigmas`` [B]."""
        raise NotImplementedError

    def shift(self, c, sigmas: torch.Tensor, height: int, width: int, fixed: float | None) -> torch.Tensor:
        """Training sigmas moved towards noise as the family's sampler does (``fixed``: the user's shift)."""
        raise NotImplementedError

    def t5(self, c):
        """The T5 encoder (None without one). Frozen always; a run keeps it in CPU memory (its 4.7B
        parameters would take 9.5 GB of the GPU for a few encodings), see training/loop.py."""
        return None

    def uses_guidance(self, c) -> bool:
        """Whether the transformer takes a guidance embedding (Flux.1-dev does; schnell and SD3 do not)."""
        return False

    def pipeline(self, c, scheduler, **replace):
        """The family's diffusers pipeline over ``c``'s modules (no copies); ``replace`` swaps some of them."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        parts = {p: replace.get(p, getattr(c, p)) for p in PARTS if p != "scheduler"}
        return cls(**{k: v for k, v in parts.items() if k in _accepts(cls)}, scheduler=scheduler)

    def supports_negative(self, c) -> bool:
        """Whether sampling takes a negative prompt (classifier-free guidance with a real unconditional pass)."""
        return True

    def guidance_default(self, c) -> float:
        """The guidance scale sampling uses when neither the user nor the model folder gives one."""
        return self.default_guidance

    def cfg_kwargs(self, c, guidance: float) -> dict:
        """Extra pipeline arguments that turn classifier-free guidance on (SD3's pipeline needs none)."""
        return {}

    def prepare_latents(self, c, latents: torch.Tensor) -> torch.Tensor:
        """Initial noise [B, C, h, w] -> the layout the pipeline's ``latents=`` takes."""
        return latents

    def latents_out(self, c, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's ``output_type="latent"`` result -> [B, C, h, w] for the VAE."""
        return latents


def _accepts(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def load_parts(where: str, index: dict, common: dict, dtype: torch.dtype, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Each part ``model_index.json`` lists, loaded with the class it names (transformers or diffusers)."""
    out: dict[str, Any] = {}
    for part in PARTS:
        entry = index.get(part)
        if not entry or entry[0] is None or part in skip:
            out[part] = None
            continue
        library, cls_name = entry
        cls = getattr(importlib.import_module(library), cls_name)
        kwargs = dict(common)
        if part.startswith(("text_encoder", "transformer", "vae")):
            kwargs["torch_dtype"] = dtype
        if part == "scheduler":
            out[part] = dict(cls.load_config(where, subfolder=part, **{k: v for k, v in kwargs.items()
                                                                     if k != "variant"}))
            continue
        if part.startswith("tokenizer"):
            kwargs.pop("variant", None)
        out[part] = cls.from_pretrained(where, subfolder=part, **kwargs)
    return out


@dataclass
class FlowSettings:
    """The objective's knobs (TrainConfig's flow-matching group, or a test's own)."""

    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float | None = None  # None: the family's own (SD3's fixed shift, Flux's resolution shift)
    loss_weighting: str = "none"
    guidance_scale: float = 3.5  # Flux.1-dev's guidance embedding during training (diffusers' script default)
    x0_loss: bool | None = None  # None: the family's (diffusers' SD3 scripts precondition outputs, Flux's do not)


def settings_of(train) -> FlowSettings:
    """The run's TrainConfig flow-matching options (guidance None: diffusers' script default)."""
    return FlowSettings(timestep_sampling=train.timestep_sampling, logit_mean=train.logit_mean,
                        logit_std=train.logit_std, mode_scale=train.mode_scale, flow_shift=train.flow_shift,
                        loss_weighting=train.loss_weighting,
                        guidance_scale=3.5 if train.guidance_scale is None else train.guidance_scale,
                        x0_loss=None if train.flow_target is None else train.flow_target == "x0")


def flow_loss_at(c, family: FlowFamily, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                 hidden: torch.Tensor, pooled: torch.Tensor, weighting: str, guidance: float,
                 x0_loss: bool | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss for given latents, noise and sigmas: what diffusers' SD3/Flux scripts compute.

    ``x0_loss`` (diffusers' SD3 ``--precondition_outputs``, on there by default): compare the implied clean
    latent noisy - sigma v with x0 instead of v with eps - x0, which is the velocity loss times sigma^2."""
    noisy = F.flow_noise(x0, noise, sigmas)
    dtype = next(c.transformer.parameters()).dtype
    pred = family.predict(c, noisy.to(dtype), sigmas, hidden.to(x0.device, dtype), pooled.to(x0.device, dtype),
                          guidance if family.uses_guidance(c) else None).float()
    if family.x0_loss if x0_loss is None else x0_loss:
        s = sigmas.to(pred.device).view(-1, *[1] * (pred.ndim - 1))
        err = (pred * -s + noisy.float() - x0.float()) ** 2
    else:
        err = (pred - F.flow_target(x0, noise).float()) ** 2
    err = F.loss_weight(weighting, sigmas).to(err.device).view(-1, *[1] * (err.ndim - 1)) * err
    return weighted_mean(err, weight)  # weight: a mask on the latent grid (masked loss), or None


def flow_loss(c, latents: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor, s: FlowSettings,
              generator: torch.Generator, rows: tuple[Sequence[int], int] | None = None,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample flow-matching loss of a batch: noise and positions drawn for the whole global batch
    (``rows=(indices, total)`` as in methods/denoise.py), so N processes train what one would."""
    family = c.flow
    indices, total = rows or (range(len(latents)), len(latents))
    pick = torch.as_tensor(list(indices), dtype=torch.long)
    noise = torch.randn((total, *latents.shape[1:]), generator=generator)[pick].to(latents.device)
    u = F.sample_u(s.timestep_sampling, total, generator, logit_mean=s.logit_mean, logit_std=s.logit_std,
                   mode_scale=s.mode_scale)[pick].clamp_min(1e-5)  # sigma 0 would weigh sigma^-2 infinitely
    h, w = (n * c.vae_scale_factor for n in latents.shape[-2:])
    sigmas = family.shift(c, u, h, w, s.flow_shift).to(latents.device)
    return flow_loss_at(c, family, latents, noise, sigmas, hidden, pooled, s.loss_weighting, s.guidance_scale,
                        s.x0_loss, weight)

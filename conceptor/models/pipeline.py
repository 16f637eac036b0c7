"""Samplers and diffusers pipelines built from a Components object: what sampling and saving both need."""
from __future__ import annotations

from ..errors import ConceptorError
from .load import Components

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


def make_scheduler(components: Components, name: str = "ddim"):
    """A sampler configured from the model's own scheduler config (betas, prediction type, offsets)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ConceptorError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if components.flow is not None:
        # On a straight noise-to-data path a deterministic DDIM step is an Euler step along the velocity,
        # so both names give the model's own flow-matching Euler sampler; the others are for UNet models.
        if name not in FLOW_SCHEDULERS:
            raise ConceptorError(f"--scheduler {name} is for UNet models; {components.flow.title} samples with "
                                 f"{' or '.join(FLOW_SCHEDULERS)} (its flow-matching Euler sampler)")
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config)
    cls = getattr(diffusers, SCHEDULERS[name])
    config = dict(components.scheduler_config)
    # Latents are not bounded to [-1, 1]; clipping them wrecks samples (SD's configs set this False too).
    config["clip_sample"] = False
    return cls.from_config(config)


FLOW_SCHEDULERS = ("euler", "ddim")


def build_pipeline(components: Components, scheduler: str = "ddim", *, vae=None, text_encoder=None,
                   text_encoder_2=None, text_encoder_3=None):
    """A diffusers pipeline over the components' modules (no copies); ``vae``/``text_encoder*`` replace
    theirs (save.py writes untouched fp32 originals where the run held rounded copies)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    c = components
    if c.flow is not None:
        replace = {"vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
                   "text_encoder_3": text_encoder_3}
        pipe = c.flow.pipeline(c, make_scheduler(c, scheduler), **{k: v for k, v in replace.items() if v is not None})
        pipe.set_progress_bar_config(disable=True)
        return pipe
    parts = dict(vae=vae or c.vae, text_encoder=text_encoder or c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                 scheduler=make_scheduler(c, scheduler))
    if c.is_sdxl:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=text_encoder_2 or c.text_encoder_2,
                                         tokenizer_2=c.tokenizer_2)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

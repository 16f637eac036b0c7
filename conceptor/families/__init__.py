"""Model families that train with flow matching: how each encodes text, lays out latents and calls its
transformer (``sd3.py``, ``flux.py``), under the one rectified-flow objective of ``flow.py``.

A family is found from the model itself (its pipeline class in ``model_index.json``, or the keys of a
single file), never from a flag default. The next family of this shape (Flux.2, Qwen-Image, Sana) is one
more file and one line in ``FAMILIES``. The UNet families (SD 1/2/XL) predate this layer and live in
``models/text.py`` and ``methods/denoise.py``.
"""
from __future__ import annotations

from .flow import FlowFamily
from .flux import FLUX
from .sd3 import SD3

FAMILIES: dict[str, FlowFamily] = {f.name: f for f in (SD3, FLUX)}
# diffusers pipeline class -> family, for folders and hub ids (model_index.json's "_class_name")
PIPELINE_FAMILIES = {f.pipeline_class: f.name for f in FAMILIES.values()}


def flow_family(name: str) -> FlowFamily | None:
    """The family layer of ``name`` ("sd3", "flux"), or None for the UNet families."""
    return FAMILIES.get(name)


def check_family_options(c, cfg) -> None:
    """Refuse options that would silently do nothing on this model's family, in one line each; then apply the
    one model option that needs the family to mean anything (--max-sequence-length, T5's slots)."""
    from ..config import TrainConfig
    from ..errors import ConceptorError

    t, default = cfg.train, TrainConfig()
    flow_flags = {"timestep_sampling": "--timestep-sampling", "logit_mean": "--logit-mean", "logit_std": "--logit-std",
                  "mode_scale": "--mode-scale", "flow_shift": "--flow-shift", "loss_weighting": "--loss-weighting",
                  "flow_target": "--flow-target",
                  "guidance_scale": "--guidance-scale"}
    family = flow_family(c.family)
    if family is None:
        for name, flag in flow_flags.items():
            if getattr(t, name) != getattr(default, name):
                raise ConceptorError(f"{flag} is a flow-matching option (SD3, Flux); {c.source} is a {c.family} "
                                     "UNet model: leave it out")
        if cfg.model.max_sequence_length is not None:
            raise ConceptorError(f"--max-sequence-length sets T5's length (SD3, Flux); {c.source} has no T5")
        if t.max_timestep is not None and t.max_timestep <= (t.min_timestep or 0):
            raise ConceptorError(f"--max-timestep {t.max_timestep} must be above --min-timestep ({t.min_timestep}"
                                 "; textual inversion's default is 400): timesteps are drawn from [MIN, MAX)")
        steps = c.scheduler.config.num_train_timesteps
        if max((t.min_timestep or 0) + 1, t.max_timestep or 0) > steps:
            raise ConceptorError(f"--min-timestep/--max-timestep must lie within {c.source}'s {steps} training "
                                 f"timesteps (MAX at most {steps})")
        return
    for ok, message in (
        (t.snr_gamma is None, f"--snr-gamma weighs epsilon/v-prediction losses; {family.title} trains flow "
                              "matching: use --loss-weighting sigma_sqrt|cosmap instead"),
        (t.noise_offset == 0, f"--noise-offset is for epsilon/v-prediction UNets; {family.title} trains flow "
                              "matching: leave it out"),
        (not t.min_timestep and t.max_timestep is None,
         f"--min-timestep/--max-timestep window DDPM timesteps of UNet models; {family.title} trains flow matching: "
         "use --timestep-sampling/--logit-mean/--flow-shift instead"),
        (t.guidance_scale is None or family.uses_guidance(c),
         f"--guidance-scale feeds a guidance embedding that {c.source} does not have (Flux.1-schnell and SD3 have "
         "none): leave it out"),
    ):
        if not ok:
            raise ConceptorError(message)
    if cfg.model.max_sequence_length is not None:
        c.max_sequence_length = cfg.model.max_sequence_length

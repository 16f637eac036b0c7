"""Typed run configuration: a YAML/TOML file, overridden by CLI flags, saved beside every output.

A config file has one section per dataclass: the shared ``model``, ``data``, ``optim``, ``train``, the
``lora`` section for methods that train adapters, and the method's own section (declared in its file under
methods/, e.g. ``textual_inversion``). Each field is written once, here or there: its metadata (``opt``)
carries the help text and flag details the CLI is built from. Unknown keys are errors, never ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .config_checks import check_finite, check_types
from .errors import ConceptorError

LORA_TARGET_SETS = ("attn", "attn-ff")  # the UNet layer sets of models/adapters.py: UNET_LORA_TARGETS
ADAPTER_KINDS = ("lora", "dora", "loha", "lokr")  # formats/lycoris.py KINDS
# data/order.py seeds torch generators with seed * 1_000_003 + epoch, and torch takes at most 2**64 - 1:
# seeds above 18446688733643 overflow at once (measured). 2**44 - 1 leaves room for 8e17 epochs, and for
# the seed + 1, seed + k streams of class images and LoRA initialisation.
MAX_TRAIN_SEED = 2**44 - 1


def opt(default: Any = None, help: str | None = None, *, factory: Callable | None = None, **cli) -> Any:
    """A config field and its CLI flag. ``cli`` keys: flag (another name than --field-name), metavar, choices,
    group (the help section), only (the methods that have it), input (a path the run reads: an output may
    never be, contain or lie inside it), cli=False (config files only)."""
    meta = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


FLOW_GROUP = "flow matching (SD3, Flux)"
MEASURE_GROUP = "measuring (when is the concept learned)"
# what --keep-best can keep; val_loss (and prior drift) are better low, the scores high
BEST_METRICS = ("val_loss", "fidelity", "similarity", "editability", "clip_t", "clip_i", "dino")
FLOW_SAMPLING = ("logit_normal", "uniform", "mode")  # training/flow.py's SCHEMES
FLOW_WEIGHTING = ("none", "sigma_sqrt", "cosmap")  # training/flow.py's WEIGHTINGS
OPTIMIZERS = ("adamw", "prodigy")  # training/optim.py make_optimizer


@dataclass
class ModelConfig:
    model: str | None = opt(None, "hub id, diffusers folder or .safetensors file (default: bundled toy model)",
                            metavar="M", input=True)
    model_config: str | None = opt(None, "local diffusers folder with configs for a single-file --model",
                                   metavar="DIR", input=True)
    family: str | None = opt(None, "model family of a single-file --model without --model-config",
                             choices=("sd1", "sd2", "sdxl"))
    revision: str | None = opt(None, None)
    variant: str | None = opt(None, "weights variant, e.g. fp16")
    vae: str | None = opt(None, "use this VAE instead of the model's (e.g. madebyollin/sdxl-vae-fp16-fix)",
                          metavar="DIR|ID", input=True)
    max_sequence_length: int | None = opt(None, "SD3/Flux: T5 tokens per prompt (default: the pipeline's, SD3 256, "
                                                "Flux.1-dev 512, schnell 256)", metavar="N")


@dataclass
class DataConfig:
    images: str | None = opt(None, "folder of training images (img.txt beside img.png = its caption)",
                             metavar="DIR", input=True, only=("textual-inversion", "dreambooth", "pivotal"))
    dataset: str | None = opt(None, "kohya dataset config (.toml: subsets, repeats, captions, masks, buckets), or "
                                    "one captioned source: a CSV (image_path,caption), a folder with metadata.jsonl "
                                    "or .txt captions, a datasets save_to_disk folder, a hub dataset name",
                              metavar="FILE|SRC", input=True)
    image_column: str | None = opt(None, "--dataset CSV/jsonl/datasets: the image column", metavar="C")
    caption_column: str | None = opt(None, "--dataset CSV/jsonl/datasets: the caption column", metavar="C")
    skip_bad: bool = opt(False, "skip (and count) unreadable images and empty rows instead of stopping")
    resolution: int | None = opt(None, "training size in pixels, multiple of 8 (default: the model's)")
    center_crop: bool = opt(False, "crop the centre square before resizing")
    flip_p: float | None = opt(None, "probability of a horizontal flip (default 0.5; finetune: 0; a dataset "
                                     "config sets flip_aug per subset)")
    repeats: int | None = opt(None, "images x repeats = one shuffled epoch (default 100; finetune 1; a dataset "
                                    "config sets num_repeats per subset)")
    buckets: bool = opt(False, "aspect-ratio buckets instead of square images")
    min_res: int | None = opt(None, "smallest bucket side (default resolution/2)", metavar="N")
    max_res: int | None = opt(None, "largest bucket side (default resolution*2)", metavar="N")
    validation_split: float | None = opt(None, "hold this share of the images out of training for the validation "
                                               "loss, e.g. 0.1 (default: none; it is measured on the training "
                                               "images; a dataset config sets validation_split)", metavar="F")
    masks: bool = opt(False, "masked loss: NAME_mask.png beside each image (white = the concept, black = the rest)")
    mask_weight: float = opt(0.0, "loss weight outside the masks (default 0: the rest is not learned)", metavar="F")

    def dataset_file(self) -> bool:
        """--dataset names a kohya dataset config (rather than one captioned source)."""
        return bool(self.dataset) and str(self.dataset).lower().endswith(".toml")


@dataclass
class OptimConfig:
    optimizer: str = opt("adamw", "adamw (default) or prodigy (Mishchenko & Defazio 2024: estimates its own step "
                                  "size; --lr becomes a multiplier, default 1.0)", choices=OPTIMIZERS)
    lr: float | None = opt(None, "learning rate (default: textual inversion 5e-3, DreamBooth 5e-6, LoRA 1e-4; "
                                 "prodigy 1.0)")
    scale_lr: bool = opt(False, "multiply lr by batch size x grad accumulation x processes")
    lr_scheduler: str | None = opt(None, "learning-rate schedule (default: textual inversion cosine, others "
                                         "constant)", choices=("constant", "cosine", "linear"))
    warmup: int = opt(0, "linear warm-up steps", metavar="N")
    adam_beta1: float = opt(0.9, cli=False)
    adam_beta2: float = opt(0.999, cli=False)
    weight_decay: float = opt(0.0, None)
    adam_epsilon: float = opt(1e-8, cli=False)
    max_grad_norm: float | None = opt(None, "clip gradients to this norm")
    use_8bit_adam: bool = opt(False, "bitsandbytes 8-bit AdamW (CUDA; saves optimizer memory)")


@dataclass
class TrainConfig:
    output: str = opt("conceptor-output", "run folder (default conceptor-output)", metavar="DIR")
    steps: int = opt(3000, "optimizer steps (default 3000)")
    batch_size: int | None = opt(None, "images per step (default: textual inversion 4, others 1)", metavar="N")
    grad_accum: int = opt(1, "micro-batches per optimizer step", metavar="N")
    mixed_precision: str = opt("no", "frozen weights in fp16/bf16; trainables stay fp32",
                               choices=("no", "fp16", "bf16"))
    seed: int = opt(0, None)
    checkpoint_every: int = opt(500, "resumable checkpoint every N steps (default 500)", metavar="N")
    checkpoints_limit: int | None = opt(None, "keep only the newest N checkpoints", metavar="N")
    resume: str | None = opt(None, "continue a run from its newest (or a given) checkpoint", metavar="latest|PATH")
    overwrite: bool = opt(False, "replace an earlier run in --output (only the files it wrote)")
    validation_prompts: list[str] = opt(help="prompt for validation grids (repeatable)", factory=list,
                                        flag="--validation-prompt", metavar="P")
    validation_every: int = opt(0, "validation grid every N steps (0: start and end only)", metavar="N")
    validation_images: int = opt(4, "images (seeds) per validation prompt", metavar="N")
    validation_sampling_steps: int = opt(25, cli=False)
    snr_gamma: float | None = opt(None, "min-SNR loss weighting (Hang et al. 2023), e.g. 5.0")
    noise_offset: float = opt(0.0, "offset noise strength, e.g. 0.05")
    # kohya's --min_timestep/--max_timestep: a window of the DDPM schedule. The high (noisy) end is where the
    # prompt decides layout and colour; the low end mostly refines texture the text barely steers.
    min_timestep: int | None = opt(None, "UNet models: draw training timesteps from MIN up (default: textual "
                                         "inversion 400 (--what style: 0), others 0)", metavar="T")
    max_timestep: int | None = opt(None, "UNet models: draw training timesteps below MAX (default: the "
                                         "schedule's length, 1000)", metavar="T")
    log_every: int = opt(10, "loss log interval in steps", metavar="N")
    epochs: int | None = opt(None, "passes over the dataset (sets --steps)", metavar="N", only=("finetune",))
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (less memory)")
    quantize: str | None = opt(None, "store the frozen transformer/UNet's Linear weights in nf4 or int8 "
                                     "(bitsandbytes) or fp8 (optimum-quanto); LoRA and embeddings train in fp32",
                               choices=("nf4", "int8", "fp8"))
    compile: bool = opt(False, "torch.compile the UNet (faster steps after a one-off compile)")
    channels_last: bool = opt(False, "UNet in channels-last memory layout (NHWC: faster convolutions with oneDNN "
                                     "and tensor cores)")
    ema: bool = opt(False, "keep an exponential moving average of the trained weights; it is saved as the "
                           "output (raw weights in OUTPUT/raw)", group="optimization")
    ema_decay: float = opt(0.9999, "EMA decay (default 0.9999)", group="optimization")
    offload_ema: bool = opt(False, "keep the EMA weights in CPU memory", group="optimization")
    # Flow matching (Esser et al. 2024), for SD3 and Flux; refused on UNet models, where they would do nothing.
    timestep_sampling: str = opt("logit_normal", "how noise levels are drawn: logit_normal (SD3's paper, default), "
                                 "uniform or mode", choices=FLOW_SAMPLING, group=FLOW_GROUP)
    logit_mean: float = opt(0.0, "logit_normal: mean (default 0)", group=FLOW_GROUP)
    logit_std: float = opt(1.0, "logit_normal: standard deviation (default 1)", group=FLOW_GROUP)
    mode_scale: float = opt(1.29, "mode: scale (default 1.29)", group=FLOW_GROUP)
    flow_shift: float | None = opt(None, "move noise levels towards noise, s -> shift s / (1 + (shift - 1) s) "
                                         "(default: the model's: SD3 3.0, Flux by image size)", group=FLOW_GROUP)
    loss_weighting: str = opt("none", "per-sample loss weight: none (default), sigma_sqrt or cosmap",
                              choices=FLOW_WEIGHTING, group=FLOW_GROUP)
    flow_target: str | None = opt(None, "what the loss compares: velocity, or x0 (the velocity loss weighted by "
                                        "sigma^2, EDM-style) (default: as diffusers' scripts, SD3 x0, Flux velocity)",
                                  choices=("velocity", "x0"), group=FLOW_GROUP)
    guidance_scale: float | None = opt(None, "Flux.1-dev: the value its guidance embedding gets while training "
                                             "(default 3.5, as diffusers' script)", group=FLOW_GROUP)
    eval_every: int = opt(0, "score the concept every N steps and at the end into metrics.jsonl: validation loss, "
                             "and fidelity/similarity/editability (toy world) or CLIP/DINO (--clip-model, "
                             "--dino-model)", metavar="N", group=MEASURE_GROUP)
    keep_best: str | None = opt(None, "keep the weights of the best-scoring evaluation as the run's output (says "
                                      "which step); needs --eval-every", choices=BEST_METRICS, metavar="METRIC",
                                group=MEASURE_GROUP)
    clip_model: str | None = opt(None, "CLIP for CLIP-T/CLIP-I scores (folder or hub id in the cache), e.g. "
                                       "openai/clip-vit-large-patch14", metavar="M", group=MEASURE_GROUP)
    dino_model: str | None = opt(None, "DINO ViT for DINO scores (folder or cached hub id), e.g. "
                                       "facebook/dino-vits16", metavar="M", group=MEASURE_GROUP)
    eval_images: int = opt(8, "images per prompt for --eval-every scores (default 8)", metavar="N",
                           group=MEASURE_GROUP)
    log_with: str | None = opt(None, "also log scalars, validation grids and the config to tensorboard "
                                     "(OUTPUT/logs) or wandb", choices=("tensorboard", "wandb"), group=MEASURE_GROUP)
    metadata_paths: bool = opt(False, "keep this machine's paths in the files' metadata (default: names only)",
                               group=MEASURE_GROUP)


@dataclass
class LoraConfig:
    """Low-rank adapters (PEFT) instead of whole modules, for every method that trains model weights."""

    enabled: bool = opt(False, "train a LoRA of the UNet attention instead of the whole UNet", flag="--lora",
                        only=("dreambooth", "finetune"))  # pivotal tuning always trains one
    rank: int = opt(4, "LoRA rank (default 4)", metavar="R")
    alpha: float | None = opt(None, "LoRA alpha (default: the rank)", metavar="A")
    targets: str = opt("attn", "UNet layers with a LoRA: attention projections (default) or attention + "
                               "feed-forward", flag="--lora-targets", choices=LORA_TARGET_SETS)
    text_encoder: bool = opt(False, "a LoRA of the text encoder too", flag="--lora-text-encoder",
                             only=("dreambooth", "pivotal"))
    init_from: str | None = opt(None, "continue training this adapter file (LoRA/DoRA/LoHa/LoKr in diffusers, PEFT or "
                                      "kohya layout; same kind, rank and layers)", flag="--init-lora", metavar="FILE",
                                input=True)
    adapter: str = opt("lora", "adapter kind: lora; dora (LoRA plus a learned norm per output, Liu et al. 2024); "
                               "loha (Hadamard product of two low-rank pairs); lokr (Kronecker product). Any but "
                               "lora implies --lora", choices=ADAPTER_KINDS)
    lokr_factor: int = opt(-1, "LoKr: size of the Kronecker product's small half; must divide every targeted "
                               "layer's sizes (-1: as square as possible)", metavar="F")
    lokr_decompose_both: bool = opt(False, "LoKr: factor the small half into rank-R matrices too (default: only "
                                           "the large half, when R is small enough)")


SHARED_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of conceptor knows of a method: declared once, in the method's own file."""

    name: str  # as on the command line: conceptor train NAME
    section: str  # its config section
    options: type  # the section's dataclass (fields declared with opt)
    make: Callable[[], Any]  # -> a training/method.py Method
    help: str
    lr: float  # default learning rate (the seeds')
    lora_lr: float | None = None  # default with --lora; None: the method trains no adapters
    flip_p: float = 0.5  # default horizontal-flip probability
    repeats: int = 100  # default --repeats (images x repeats = one epoch)
    # The recipe (issue 25: measured on the toy world's learning curves, kept where the literature agrees; see
    # docs/benchmarks.md "Learning curves"): images per step, lr schedule, lowest DDPM timestep (UNet models).
    batch_size: int = 1
    lr_scheduler: str = "constant"
    min_timestep: int | Callable[["RunConfig"], int] = 0  # or a function of the run's config
    lora_always: bool = False  # the method is a LoRA method (pivotal tuning): no --lora switch
    checks: Callable[["RunConfig"], list[tuple[bool, str]]] = lambda cfg: []

    @property
    def adapters(self) -> bool:
        return self.lora_lr is not None


@dataclass
class RunConfig:
    method: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig | None = None  # methods that train adapters
    section: str = ""  # the method's own section: its name and values
    options: Any = None

    def __getattr__(self, name: str):
        # cfg.dreambooth, cfg.textual_inversion ...: the method's own section under its own name, as files
        # and callers spell it.
        if name in ("section", "options") or name.startswith("__"):
            raise AttributeError(name)
        if name == self.section:
            return self.options
        raise AttributeError(f"this {self.method} run has no {name!r} section")

    def sections(self) -> dict[str, Any]:
        """Every section this run has, by name, in file order."""
        out = {"model": self.model, "data": self.data, "optim": self.optim, "train": self.train}
        if self.lora is not None:
            out["lora"] = self.lora
        out[self.section] = self.options
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **{k: dataclasses.asdict(v) for k, v in self.sections().items()}}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def input_paths(self) -> dict[str, str]:
        """{flag: path} of every setting the run reads from disk (fields declared with input=True)."""
        from .config_checks import option_name

        return {option_name(name, f): getattr(values, f.name) for name, values in self.sections().items()
                for f in dataclasses.fields(values) if f.metadata.get("input") and getattr(values, f.name)}



# The first configs kept LoRA settings in the method's section; files and callers written then still work.
_LEGACY_LORA_KEYS = {"lora": "enabled", "rank": "rank", "alpha": "alpha", "lora_targets": "targets",
                     "lora_text_encoder": "text_encoder"}
# finetune's section held its data source and buckets until every method had them (issue 21).
_LEGACY_DATA_KEYS = ("dataset", "image_column", "caption_column", "skip_bad", "buckets", "min_res", "max_res")


def _lift_legacy_lora(section: str, values: dict[str, Any]) -> tuple[dict, dict]:
    """(method values, lora values) from a method section that may still hold LoRA keys."""
    own = {k: v for k, v in values.items() if k not in _LEGACY_LORA_KEYS}
    return own, {_LEGACY_LORA_KEYS[k]: v for k, v in values.items() if k in _LEGACY_LORA_KEYS}


def build_config(method: str | MethodSpec, file_values: dict[str, Any] | None,
                 overrides: dict[str, dict[str, Any]]) -> RunConfig:
    """Merge file values and CLI overrides (section -> key -> value; None means 'not given'), then check."""
    if isinstance(method, str):
        from .methods import get_spec  # the registry: methods/__init__.py (names -> their files)

        method = get_spec(method)
    spec = method
    classes = {**SHARED_SECTIONS, **({"lora": LoraConfig} if spec.adapters else {}), spec.section: spec.options}
    merged: dict[str, dict[str, Any]] = {name: {} for name in classes}
    layers = [(True, (file_values or {}).items()), (False, overrides.items())]
    for from_file, items in layers:
        for name, values in items:
            if name == "method":
                if values != spec.name:
                    raise ConceptorError(f"config file is for method {values!r}, not {spec.name!r}")
                continue
            if name not in classes:
                raise ConceptorError(f"unknown config section {name!r}; valid: {', '.join(classes)}")
            if not isinstance(values, dict):
                raise ConceptorError(f"config section {name!r} must be a mapping of key: value")
            if not from_file:
                values = {k: v for k, v in values.items() if v is not None}
            if name == spec.section and any(k in values for k in _LEGACY_DATA_KEYS):
                lifted = {k: values[k] for k in _LEGACY_DATA_KEYS if k in values}
                values = {k: v for k, v in values.items() if k not in lifted}
                if from_file:
                    check_types("data", DataConfig, lifted)
                merged["data"].update(lifted)
            if name == spec.section and spec.adapters:
                values, lifted = _lift_legacy_lora(name, values)
                if from_file:
                    check_types("lora", LoraConfig, lifted)
                merged["lora"].update(lifted)
            if from_file:
                check_types(name, classes[name], values)
            merged[name].update(values)
    sections = {}
    for name, cls in classes.items():
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged[name]) - names)
        if unknown:
            raise ConceptorError(f"unknown key(s) {', '.join(unknown)} in section {name!r}; "
                                 f"valid: {', '.join(sorted(names))}")
        sections[name] = cls(**merged[name])
    cfg = RunConfig(method=spec.name, model=sections["model"], data=sections["data"], optim=sections["optim"],
                    train=sections["train"], lora=sections.get("lora"), section=spec.section,
                    options=sections[spec.section])
    d = cfg.data
    if d.dataset_file():  # the file says these per subset/dataset; a flag too would be one of two truths
        given = [flag for flag, v in (("--images", d.images), ("--flip-p", d.flip_p), ("--repeats", d.repeats),
                                      ("--buckets", d.buckets), ("--min-res", d.min_res), ("--max-res", d.max_res),
                                      ("--center-crop", d.center_crop), ("--masks", d.masks),
                                      ("--image-column", d.image_column), ("--caption-column", d.caption_column),
                                      ("--validation-split", d.validation_split))
                 if v not in (None, False)]
        if given:
            raise ConceptorError(f"{given[0]} and --dataset {d.dataset} both describe the data; set it in the dataset "
                                 "config (flip_aug, num_repeats, enable_bucket, min/max_bucket_reso, masks, "
                                 "image_column ... per dataset or subset) or leave --dataset out")
    if spec.lora_always or (cfg.lora is not None and cfg.lora.adapter != "lora"):
        cfg.lora.enabled = True  # --adapter loha etc. says adapters as clearly as --lora does
    if cfg.data.flip_p is None:
        cfg.data.flip_p = spec.flip_p
    if cfg.data.repeats is None and not d.dataset_file():
        cfg.data.repeats = spec.repeats
    if cfg.train.batch_size is None:
        cfg.train.batch_size = spec.batch_size
    if cfg.optim.lr_scheduler is None:
        cfg.optim.lr_scheduler = spec.lr_scheduler
    if cfg.optim.lr is None:
        if cfg.optim.optimizer == "prodigy":  # Prodigy finds the step size; lr scales it (its authors' default 1.0)
            cfg.optim.lr = 1.0
        else:
            cfg.optim.lr = spec.lora_lr if cfg.lora is not None and cfg.lora.enabled else spec.lr
    validate(cfg, spec)
    return cfg


def validate(cfg: RunConfig, spec: MethodSpec) -> None:
    """Checks that need no model: each failure is one actionable line. Shared sections here, the method's
    own in its spec, so Python callers get exactly what the CLI gets."""
    check_finite(cfg.sections())
    t, o, d = cfg.train, cfg.optim, cfg.data
    checks = [
        (t.steps >= 1, "--steps must be at least 1"),
        (t.batch_size >= 1, "--batch-size must be at least 1"),
        (t.grad_accum >= 1, "--grad-accum must be at least 1"),
        (t.mixed_precision in ("no", "fp16", "bf16"), "--mixed-precision must be no, fp16 or bf16"),
        (t.checkpoint_every >= 0, "--checkpoint-every must be >= 0 (0 = only at the end)"),
        (t.checkpoints_limit is None or t.checkpoints_limit >= 1, "--checkpoints-limit must be at least 1"),
        (t.validation_every >= 0, "--validation-every must be >= 0"),
        (t.log_every >= 1, "--log-every must be at least 1"),
        (t.validation_images >= 1, "--validation-images must be at least 1"),
        (t.eval_every >= 0, "--eval-every must be >= 0"),
        (t.eval_images >= 1, "--eval-images must be at least 1"),
        (t.keep_best is None or t.eval_every > 0, f"--keep-best {t.keep_best} needs --eval-every N (how often to "
                                                  "score the concept)"),
        (not (t.keep_best and t.ema), "--keep-best keeps raw weights of one step; with --ema the output is the "
                                      "average over steps: use one or the other"),
        (t.keep_best not in ("clip_t", "clip_i") or t.clip_model, f"--keep-best {t.keep_best} needs --clip-model"),
        (t.keep_best != "dino" or t.dino_model, "--keep-best dino needs --dino-model"),
        (t.validation_sampling_steps >= 1, "train.validation_sampling_steps must be at least 1"),
        (0 <= t.seed <= MAX_TRAIN_SEED, f"--seed must be between 0 and {MAX_TRAIN_SEED}, got {t.seed}"),
        (t.snr_gamma is None or t.snr_gamma > 0, "--snr-gamma must be positive (5.0 is the paper's value)"),
        (t.noise_offset >= 0, "--noise-offset must be >= 0"),
        (t.min_timestep is None or t.min_timestep >= 0, "--min-timestep must be >= 0"),
        (t.max_timestep is None or t.max_timestep > (t.min_timestep or 0),
         f"--max-timestep must be above --min-timestep ({t.min_timestep or 0}): timesteps are drawn from [MIN, MAX)"),
        (t.logit_std > 0, "--logit-std must be positive"),
        (t.flow_shift is None or t.flow_shift > 0, "--flow-shift must be positive (1 = no shift, SD3 uses 3.0)"),
        (t.guidance_scale is None or t.guidance_scale >= 0, "--guidance-scale must be >= 0"),
        (cfg.model.max_sequence_length is None or 1 <= cfg.model.max_sequence_length <= 512,
         "--max-sequence-length must be between 1 and 512 (T5's limit)"),
        (o.lr is not None and o.lr > 0, "--lr must be positive"),
        (0 < t.ema_decay < 1, "--ema-decay must be between 0 and 1, e.g. 0.9999"),
        (o.lr_scheduler in ("constant", "cosine", "linear"), "--lr-scheduler must be constant, cosine or linear"),
        (o.warmup >= 0, "--warmup must be >= 0"),
        (o.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
        (not (o.use_8bit_adam and o.optimizer != "adamw"), "--use-8bit-adam is an AdamW; leave it out with "
                                                            f"--optimizer {o.optimizer}"),
        (o.max_grad_norm is None or o.max_grad_norm > 0,
         "--max-grad-norm must be positive (e.g. 1.0); leave it out for no clipping"),
        (o.weight_decay >= 0, "--weight-decay must be >= 0"),
        (0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "optim.adam_beta1 and adam_beta2 must be in [0, 1), "
                                                           "e.g. 0.9 and 0.999"),
        (o.adam_epsilon > 0, "optim.adam_epsilon must be positive, e.g. 1e-8"),
        (d.resolution is None or (d.resolution > 0 and d.resolution % 8 == 0),
         f"--resolution {d.resolution} must be a positive multiple of 8 (e.g. 512)"),
        (0.0 <= d.flip_p <= 1.0, "--flip-p must be between 0 and 1"),
        (d.repeats is None or d.repeats >= 1, "--repeats must be at least 1"),
        (not (d.images and d.dataset), "give --images (a folder) or --dataset (a dataset config or source), not both"),
        (d.min_res is None or d.max_res is None or d.min_res <= d.max_res, "--min-res must be <= --max-res"),
        (d.min_res is None or d.min_res > 0, "--min-res must be positive"),
        (d.validation_split is None or 0 <= d.validation_split < 1, "--validation-split must be in [0, 1), e.g. 0.1"),
        (d.mask_weight >= 0, "--mask-weight must be >= 0 (0: outside the mask is not learned, 1: no mask)"),
        (t.epochs is None or t.epochs >= 1, "--epochs must be at least 1"),
    ]
    checks.append((t.quantize is None or cfg.lora is None or cfg.lora.enabled,
                   f"--quantize {t.quantize} freezes the model in low precision, so it cannot be fine-tuned whole; "
                   "train a LoRA (--lora) on it, or leave --quantize out"))
    if cfg.lora is not None:
        lo = cfg.lora
        checks += [
            (lo.rank >= 1, "--rank must be at least 1"),
            (lo.alpha is None or lo.alpha > 0, "--alpha must be positive"),
            (lo.targets in LORA_TARGET_SETS, f"--lora-targets must be one of {', '.join(LORA_TARGET_SETS)}"),
            (not lo.text_encoder or lo.enabled, "--lora-text-encoder needs --lora"),
            (not lo.init_from or lo.enabled, "--init-lora needs --lora"),
            (lo.adapter in ADAPTER_KINDS, f"--adapter must be one of {', '.join(ADAPTER_KINDS)}"),
            (lo.lokr_factor == -1 or lo.lokr_factor >= 1, "--lokr-factor must be -1 (as square as possible) or a "
                                                          "positive divisor of the layers' sizes"),
            (lo.adapter == "lokr" or (lo.lokr_factor == -1 and not lo.lokr_decompose_both),
             "--lokr-factor and --lokr-decompose-both shape a LoKr: add --adapter lokr"),
        ]
    for ok, message in checks + list(spec.checks(cfg)):
        if not ok:
            raise ConceptorError(message)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) config file into nested dicts."""
    p = Path(path)
    if not p.is_file():
        raise ConceptorError(f"config file {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except Exception as e:  # any parser error is the user's file, one line is enough
        raise ConceptorError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConceptorError(f"config file {path} must hold sections like 'train:' and 'optim:'")
    return data



def config_from_saved(path: str | Path) -> dict[str, Any]:
    """Read a run's saved ``config.yaml`` back; an unreadable or non-mapping file is one line, not a traceback."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:  # unreadable, not UTF-8, not YAML
        raise ConceptorError(f"{path} is damaged ({type(e).__name__}); conceptor cannot use that run") from None
    if not isinstance(data, dict):
        raise ConceptorError(f"{path} is damaged (not a mapping of sections); conceptor cannot use that run")
    return data



"""Typed run configuration: a YAML/TOML file, overridden by CLI flags, saved beside every output.

A config file has one section per dataclass below (``model``, ``data``, ``optim``, ``train`` and the
method's own section, e.g. ``textual_inversion``). Unknown keys are errors, not silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConceptorError

LORA_TARGET_SETS = ("attn", "attn-ff")  # the UNet layer sets of models/adapters.py: UNET_LORA_TARGETS


@dataclass
class ModelConfig:
    model: str | None = None  # hub id, diffusers folder or .safetensors file; None = the bundled model
    model_config: str | None = None  # local diffusers folder with configs for a single-file checkpoint
    family: str | None = None  # sd1 | sd2: configs for a single file when there is no model_config
    revision: str | None = None
    variant: str | None = None
    vae: str | None = None  # another VAE (folder or hub id), e.g. an fp16-fixed SDXL VAE


@dataclass
class DataConfig:
    images: str | None = None
    resolution: int | None = None  # None = the model's native size
    center_crop: bool = False
    flip_p: float | None = None  # None = the method's default (DEFAULT_FLIP_P)
    repeats: int = 100  # the seeds' epoch = images x repeats; only sets how data order is shuffled


@dataclass
class OptimConfig:
    lr: float | None = None  # None = the method's default (DEFAULT_LR)
    scale_lr: bool = False  # lr x batch x grad_accum x processes, as the seeds' --scale_lr
    lr_scheduler: str = "constant"
    warmup: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = None
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit: optimizer state in 8 bits (CUDA only)


@dataclass
class TrainConfig:
    output: str = "conceptor-output"
    steps: int = 3000
    batch_size: int = 1
    grad_accum: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 500
    checkpoints_limit: int | None = None
    resume: str | None = None
    overwrite: bool = False
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 0  # 0 = only at the start and the end
    validation_images: int = 4
    validation_sampling_steps: int = 25
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    log_every: int = 10
    epochs: int | None = None  # finetune: passes over the dataset; sets steps
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the UNet (first steps pay the compile time, reported apart)
    channels_last: bool = False  # UNet weights and activations in NHWC (oneDNN / tensor-core friendly)
    ema: bool = False  # exponential moving average of the trained weights, saved as the output
    ema_decay: float = 0.9999
    offload_ema: bool = False  # keep the average in CPU memory between steps


@dataclass
class TextualInversionConfig:
    token: str = ""
    init_token: str = ""
    vectors: int = 1
    what: str = "object"
    templates: str | None = None


@dataclass
class DreamBoothConfig:
    instance_prompt: str = ""
    class_prompt: str | None = None  # given = prior preservation on
    class_images: str | None = None  # default OUTPUT/class_images; missing images are generated there
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_sampling_steps: int = 25
    class_guidance: float | None = None  # None = the model's default guidance
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # default: --lr
    lora: bool = False
    rank: int = 4
    alpha: float | None = None  # default: rank (scale 1)
    lora_targets: str = "attn"  # attn | attn-ff (models/adapters.py)
    lora_text_encoder: bool = False
    save_single_file: bool = False


@dataclass
class FinetuneConfig:
    dataset: str = ""  # CSV, imagefolder with metadata.jsonl, images + .txt, saved HF dataset, hub name
    image_column: str | None = None
    caption_column: str | None = None
    skip_bad: bool = False
    caption_dropout: float = 0.0  # probability of an empty caption (what classifier-free guidance needs)
    buckets: bool = False
    min_res: int | None = None  # bucket side limits (default resolution/2 .. resolution*2)
    max_res: int | None = None
    random_crop: bool = False  # else centre crop; random crops cannot be cached, latents are encoded per step
    lora: bool = False
    rank: int = 4
    alpha: float | None = None
    lora_targets: str = "attn"  # attn | attn-ff (models/adapters.py)
    save_single_file: bool = False
    cache_dir: str | None = None  # default ~/.cache/conceptor; "none" disables the on-disk cache


@dataclass
class RunConfig:
    method: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    textual_inversion: TextualInversionConfig | None = None
    dreambooth: DreamBoothConfig | None = None
    finetune: FinetuneConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


METHOD_SECTIONS = {"textual-inversion": ("textual_inversion", TextualInversionConfig),
                   "dreambooth": ("dreambooth", DreamBoothConfig),
                   "finetune": ("finetune", FinetuneConfig)}
# Flips: on for the few photos of a concept (more views; diffusers' textual inversion flips at 0.5), off for
# captioned datasets, as train_text_to_image's opt-in --random_flip: a dataset's look can be one-sided, and
# mirroring it teaches a second look (toyworld/style.py measured exactly that).
DEFAULT_FLIP_P = {"textual-inversion": 0.5, "dreambooth": 0.5, "finetune": 0.0}
# The seeds' learning rates: TI moves a few vectors, full DreamBooth the whole UNet, LoRA a small adapter.
DEFAULT_LR = {"textual-inversion": 5e-4, "dreambooth": 5e-6, "dreambooth-lora": 1e-4, "finetune": 1e-5,
              "finetune-lora": 1e-4}
_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


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


# What a config value must be, in the file's own words. An int field takes no bool (YAML's yes/no) and no
# 3.0: a step count written as a float is more likely a typo than a wish; a float field takes ints.
_KINDS = {bool: ("true or false", lambda v: isinstance(v, bool)),
          int: ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
          str: ("a string", lambda v: isinstance(v, str))}
_PLURAL = {bool: "true/false values", int: "whole numbers", float: "numbers", str: "strings"}


def _kind_problem(hint: Any, value: Any) -> str | None:
    """What ``value`` should be when it does not fit the annotation ``hint``; None when it fits."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return None
        problem = _kind_problem(next(a for a in args if a is not type(None)), value)
        return problem and f"{problem} or null"
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        ok = isinstance(value, list) and all(_kind_problem(item, v) is None for v in value)
        return None if ok else f"a list of {_PLURAL[item]}"
    if hint not in _KINDS:  # a field type this table does not know yet: its own checks apply
        return None
    word, fits = _KINDS[hint]
    return None if fits(value) else word


def _shown(value: Any) -> str:
    """A file value as the user wrote it, one short line."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_types(section: str, cls: type, values: dict[str, Any]) -> None:
    """Every known key of a config-file section against its dataclass annotation (unknown keys are caught later)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        problem = _kind_problem(hints[key], value) if key in hints else None
        if problem:
            raise ConceptorError(f"config file: {section}.{key} must be {problem}, got {_shown(value)}")


def build_config(method: str, file_values: dict[str, Any] | None, overrides: dict[str, dict[str, Any]]) -> RunConfig:
    """Merge file values and CLI overrides (section -> key -> value; None means 'not given')."""
    if method not in METHOD_SECTIONS:
        raise ConceptorError(f"unknown method {method!r}; choose one of {', '.join(METHOD_SECTIONS)}")
    method_key, method_cls = METHOD_SECTIONS[method]
    classes = {**_SECTIONS, method_key: method_cls}
    merged: dict[str, dict[str, Any]] = {name: {} for name in classes}
    for name, values in (file_values or {}).items():
        if name == "method":
            if values != method:
                raise ConceptorError(f"config file is for method {values!r}, not {method!r}")
            continue
        if name not in classes:
            raise ConceptorError(f"unknown config section {name!r}; valid: {', '.join(classes)}")
        if not isinstance(values, dict):
            raise ConceptorError(f"config section {name!r} must be a mapping of key: value")
        check_types(name, classes[name], values)
        merged[name].update(values)
    for name, values in overrides.items():
        merged[name].update({k: v for k, v in values.items() if v is not None})
    sections = {}
    for name, cls in classes.items():
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged[name]) - names)
        if unknown:
            raise ConceptorError(f"unknown key(s) {', '.join(unknown)} in section {name!r}; "
                                 f"valid: {', '.join(sorted(names))}")
        sections[name] = cls(**merged[name])
    cfg = RunConfig(method=method, **sections)
    if cfg.data.flip_p is None:
        cfg.data.flip_p = DEFAULT_FLIP_P[method]
    if cfg.optim.lr is None:
        lora = (cfg.dreambooth and cfg.dreambooth.lora) or (cfg.finetune and cfg.finetune.lora)
        cfg.optim.lr = DEFAULT_LR[method + ("-lora" if lora else "")]
    validate(cfg)
    return cfg


# Keys with no CLI flag: a message names them as the config file spells them.
_FILE_ONLY = {"adam_beta1", "adam_beta2", "adam_epsilon", "validation_sampling_steps"}
# data/order.py seeds torch generators with seed * 1_000_003 + epoch, and torch takes at most 2**64 - 1:
# seeds above 18446688733643 overflow at once (measured). 2**44 - 1 leaves room for 8e17 epochs, and for
# the seed + 1, seed + k streams of class images and LoRA initialisation.
MAX_TRAIN_SEED = 2**44 - 1


def option_name(section: str, key: str) -> str:
    """How the user gave a setting: its flag, or section.key for settings only a config file holds."""
    return f"{section}.{key}" if key in _FILE_ONLY else "--" + key.replace("_", "-")


def check_finite(cfg: RunConfig) -> None:
    """NaN/inf in any float setting (a config file's .nan, a flag's 'inf') passes every < and > test silently."""
    for section in (f.name for f in dataclasses.fields(cfg) if f.name != "method"):
        values = getattr(cfg, section)
        if values is None:  # another method's section
            continue
        for key, hint in typing.get_type_hints(type(values)).items():
            value = getattr(values, key)
            if float in (hint, *typing.get_args(hint)) and value is not None and not math.isfinite(value):
                raise ConceptorError(f"{option_name(section, key)} must be a finite number, got {value}")


def validate(cfg: RunConfig) -> None:
    """Checks that need no model: each failure is one actionable line."""
    check_finite(cfg)
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
        (t.validation_sampling_steps >= 1, "train.validation_sampling_steps must be at least 1"),
        (0 <= t.seed <= MAX_TRAIN_SEED, f"--seed must be between 0 and {MAX_TRAIN_SEED}, got {t.seed}"),
        (t.snr_gamma is None or t.snr_gamma > 0, "--snr-gamma must be positive (5.0 is the paper's value)"),
        (t.noise_offset >= 0, "--noise-offset must be >= 0"),
        (o.lr is not None and o.lr > 0, "--lr must be positive"),
        (0 < t.ema_decay < 1, "--ema-decay must be between 0 and 1, e.g. 0.9999"),
        (o.lr_scheduler in ("constant", "cosine", "linear"), "--lr-scheduler must be constant, cosine or linear"),
        (o.warmup >= 0, "--warmup must be >= 0"),
        (o.max_grad_norm is None or o.max_grad_norm > 0,
         "--max-grad-norm must be positive (e.g. 1.0); leave it out for no clipping"),
        (o.weight_decay >= 0, "--weight-decay must be >= 0"),
        (0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "optim.adam_beta1 and adam_beta2 must be in [0, 1), "
                                                           "e.g. 0.9 and 0.999"),
        (o.adam_epsilon > 0, "optim.adam_epsilon must be positive, e.g. 1e-8"),
        (d.resolution is None or (d.resolution > 0 and d.resolution % 8 == 0),
         f"--resolution {d.resolution} must be a positive multiple of 8 (e.g. 512)"),
        (0.0 <= d.flip_p <= 1.0, "--flip-p must be between 0 and 1"),
        (d.repeats >= 1, "--repeats must be at least 1"),
    ]
    if cfg.textual_inversion is not None:
        ti = cfg.textual_inversion
        checks += [
            (bool(ti.token), "--token is required, e.g. --token '<cat-toy>'"),
            (bool(ti.init_token), "--init-token is required: one word close to the concept, e.g. toy"),
            (1 <= ti.vectors <= 64, "--vectors must be between 1 and 64"),
            (ti.what in ("object", "style"), "--what must be object or style"),
        ]
    if cfg.dreambooth is not None:
        db = cfg.dreambooth
        checks += [
            (bool(db.instance_prompt), "--instance-prompt is required, e.g. 'a photo of sks toy'"),
            (db.num_class_images >= 1, "--num-class-images must be at least 1"),
            (db.class_sampling_steps >= 1, "--class-sampling-steps must be at least 1"),
            (db.prior_loss_weight >= 0, "--prior-loss-weight must be >= 0"),
            (db.rank >= 1, "--rank must be at least 1"),
            (db.lora_targets in LORA_TARGET_SETS, f"--lora-targets must be one of {', '.join(LORA_TARGET_SETS)}"),
            (db.alpha is None or db.alpha > 0, "--alpha must be positive"),
            (not db.lora_text_encoder or db.lora, "--lora-text-encoder needs --lora"),
            (not (db.lora and db.train_text_encoder),
             "with --lora, train the text encoder as a LoRA too: --lora-text-encoder (not --train-text-encoder)"),
            (not (db.lora and db.save_single_file),
             "--save-single-file writes a full model; a LoRA run writes pytorch_lora_weights.safetensors"),
            (db.class_images is None or db.class_prompt,
             "--class-images needs --class-prompt (the prompt its images show, e.g. 'a photo of a toy')"),
            (db.text_encoder_lr is None or db.text_encoder_lr > 0, "--text-encoder-lr must be positive"),
        ]
    if cfg.finetune is not None:
        ft = cfg.finetune
        checks += [
            (bool(ft.dataset), "--dataset is required: a CSV, an image folder (metadata.jsonl or .txt captions) "
                               "or a saved Hugging Face dataset"),
            (0 <= ft.caption_dropout < 1, "--caption-dropout must be in [0, 1)"),
            (ft.rank >= 1, "--rank must be at least 1"),
            (ft.alpha is None or ft.alpha > 0, "--alpha must be positive"),
            (ft.lora_targets in LORA_TARGET_SETS, f"--lora-targets must be one of {', '.join(LORA_TARGET_SETS)}"),
            (not (ft.lora and ft.save_single_file), "--save-single-file writes a full model, not a LoRA"),
            (ft.min_res is None or ft.max_res is None or ft.min_res <= ft.max_res, "--min-res must be <= --max-res"),
            (t.epochs is None or t.epochs >= 1, "--epochs must be at least 1"),
        ]
    for ok, message in checks:
        if not ok:
            raise ConceptorError(message)


def config_from_saved(path: str | Path) -> dict[str, Any]:
    """Read a saved ``config.yaml`` back (for resume checks)."""
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def dumps_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)

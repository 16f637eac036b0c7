"""Typed run configuration: a YAML/TOML file, overridden by CLI flags, saved beside every output.

A config file has one section per dataclass below (``model``, ``data``, ``optim``, ``train`` and the
method's own section, e.g. ``textual_inversion``). Unknown keys are errors, not silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConceptorError


@dataclass
class ModelConfig:
    model: str | None = None  # hub id, diffusers folder or .safetensors file; None = the bundled model
    model_config: str | None = None  # local diffusers folder with configs for a single-file checkpoint
    family: str | None = None  # sd1 | sd2: configs for a single file when there is no model_config
    revision: str | None = None
    variant: str | None = None


@dataclass
class DataConfig:
    images: str | None = None
    resolution: int | None = None  # None = the model's native size
    center_crop: bool = False
    flip_p: float = 0.5
    repeats: int = 100  # the seeds' epoch = images x repeats; only sets how data order is shuffled


@dataclass
class OptimConfig:
    lr: float = 5e-4
    scale_lr: bool = False  # lr x batch x grad_accum x processes, as the seeds' --scale_lr
    lr_scheduler: str = "constant"
    warmup: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = None


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


@dataclass
class TextualInversionConfig:
    token: str = ""
    init_token: str = ""
    vectors: int = 1
    what: str = "object"
    templates: str | None = None


@dataclass
class RunConfig:
    method: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    textual_inversion: TextualInversionConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


METHOD_SECTIONS = {"textual-inversion": ("textual_inversion", TextualInversionConfig)}
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
        merged[name].update(values)
    for name, values in overrides.items():
        merged[name].update({k: v for k, v in values.items() if v is not None})
    sections = {}
    for name, cls in classes.items():
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged[name]) - names)
        if unknown:
            raise ConceptorError(f"unknown key(s) {', '.join(unknown)} in section {name!r}; valid: {', '.join(sorted(names))}")
        sections[name] = cls(**merged[name])
    cfg = RunConfig(method=method, **sections)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need no model: each failure is one actionable line."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    checks = [
        (t.steps >= 1, "--steps must be at least 1"),
        (t.batch_size >= 1, "--batch-size must be at least 1"),
        (t.grad_accum >= 1, "--grad-accum must be at least 1"),
        (t.mixed_precision in ("no", "fp16", "bf16"), "--mixed-precision must be no, fp16 or bf16"),
        (t.checkpoint_every >= 0, "--checkpoint-every must be >= 0 (0 = only at the end)"),
        (t.checkpoints_limit is None or t.checkpoints_limit >= 1, "--checkpoints-limit must be at least 1"),
        (t.validation_every >= 0, "--validation-every must be >= 0"),
        (t.snr_gamma is None or t.snr_gamma > 0, "--snr-gamma must be positive (5.0 is the paper's value)"),
        (t.noise_offset >= 0, "--noise-offset must be >= 0"),
        (o.lr > 0, "--lr must be positive"),
        (o.lr_scheduler in ("constant", "cosine", "linear"), "--lr-scheduler must be constant, cosine or linear"),
        (o.warmup >= 0, "--warmup must be >= 0"),
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
    for ok, message in checks:
        if not ok:
            raise ConceptorError(message)


def config_from_saved(path: str | Path) -> dict[str, Any]:
    """Read a saved ``config.yaml`` back (for resume checks)."""
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def dumps_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)

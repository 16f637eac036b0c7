"""--log-with tensorboard|wandb: the run's scalars, validation grids and resolved config through accelerate's
trackers (accelerate owns the formats; conceptor only decides what is logged). Default: none, and then nothing
here does anything."""
from __future__ import annotations

import importlib.util
import json

from ..config import RunConfig
from ..errors import ConceptorError

PACKAGES = {"tensorboard": ("tensorboard", "pip install 'conceptor[track]'"), "wandb": ("wandb", "pip install wandb")}


def check(log_with: str | None) -> None:
    """The tracker's package is installed, or one line that says how to get it."""
    if log_with is None:
        return
    module, how = PACKAGES[log_with]
    if importlib.util.find_spec(module) is None:
        raise ConceptorError(f"--log-with {log_with} needs the {module} package: {how}")


def _flat(config: dict, prefix: str = "") -> dict:
    """Nested config -> {"train.lr": 1e-4, ...} with values a tracker's hparams take (numbers, text, bools)."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is not None:
            out[key] = json.dumps(v)
    return out


def start(accelerator, cfg: RunConfig) -> None:
    if cfg.train.log_with and accelerator.is_main_process:
        name = str(cfg.train.output).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "conceptor"
        accelerator.init_trackers(name, config=_flat(cfg.to_dict()))


def log(accelerator, cfg: RunConfig, values: dict, step: int) -> None:
    if cfg.train.log_with and accelerator.is_main_process:
        accelerator.log(values, step=step)


def log_grid(accelerator, cfg: RunConfig, image, step: int) -> None:
    """A validation grid (PIL) as an image: TensorBoard's add_image (HWC), wandb's Image."""
    if not (cfg.train.log_with and accelerator.is_main_process):
        return
    import numpy as np

    tracker = accelerator.get_tracker(cfg.train.log_with, unwrap=True)
    if cfg.train.log_with == "tensorboard":
        tracker.add_image("validation", np.asarray(image), step, dataformats="HWC")
    else:
        import wandb

        tracker.log({"validation": wandb.Image(image)}, step=step)


def end(accelerator, cfg: RunConfig) -> None:
    if cfg.train.log_with:
        accelerator.end_training()

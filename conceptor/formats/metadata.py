"""The ``__metadata__`` header of the .safetensors files conceptor writes: ModelSpec and kohya keys.

A1111, Forge, ComfyUI and LoRA managers (civitai's uploader, sd-webui-additional-networks) read two sets of
keys, so we write both, with the names and value formats kohya's sd-scripts writes (library/sai_model_spec.py,
train_network.py, library/train_util.py):

- ModelSpec (``modelspec.*``): architecture, title, resolution "512x512", date, trigger phrase.
- kohya (``ss_*``): A1111 sorts LoRAs by ``ss_base_model_version`` ("sdxl_" prefix) and ``ss_v2`` ("True"),
  and shows ``ss_tag_frequency`` (JSON ``{dataset: {tag: count}}``) as the LoRA's training tags.

Every value is a string (the format's rule). A file travels, so it never carries a machine path: paths are
reduced to their last component unless the caller asks to keep them. This module takes plain values (a config
as a dict) so formats/ stays free of training code.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from .._version import __version__

# kohya has written "1.0.1" since it added prediction_type/encoder_layer (commit d24d7338); readers ignore it.
SPEC_VERSION = "1.0.1"
# family -> (modelspec architecture, ss_base_model_version), as kohya's determine_architecture and
# model_util.get_model_version_str_for_sd1_sd2 / sdxl_model_util / flux_utils spell them.
_ARCH = {"sd1": ("stable-diffusion-v1", "sd_v1"), "sd2": ("stable-diffusion-v2-512", "sd_v2"),
         "sd2-v": ("stable-diffusion-v2-768-v", "sd_v2_v"), "sdxl": ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0"),
         "sd3": ("stable-diffusion-3", "sd3"), "flux": ("flux-1-dev", "flux1"),
         "flux-dev": ("flux-1-dev", "flux1"), "flux-schnell": ("flux-1-schnell", "flux1")}
KINDS = ("lora", "textual-inversion", "checkpoint")
# kohya's determine_implementation: the code the weights' layout is for, not the trainer that made them
# (the trainer goes in modelspec.implementation_version, as kohya's "sd-scripts/<commit>").
_IMPL_SGM = "https://github.com/Stability-AI/generative-models"
_IMPL_FLUX = "https://github.com/black-forest-labs/flux"
_DEFAULT_RESOLUTION = {"sdxl": 1024, "sd3": 1024, "flux": 1024, "flux-dev": 1024, "flux-schnell": 1024, "sd2-v": 768}


def build_metadata(*, family: str, kind: str = "lora", title: str | None = None, trigger_phrase: str | None = None,
                   resolution: int | tuple[int, int] | None = None, prediction_type: str | None = None,
                   base_model: str | None = None, base_model_hash: str | None = None,
                   rank: int | None = None, alpha: float | None = None, steps: int | None = None,
                   epoch: int | None = None, started_at: float | None = None, finished_at: float | None = None,
                   tag_frequency: Mapping[str, Mapping[str, int]] | None = None, output_name: str | None = None,
                   config: Mapping[str, Any] | None = None, keep_paths: bool = False, adapter: str = "lora",
                   lokr_factor: int | None = None) -> dict[str, str]:
    """The ``__metadata__`` dict (all strings) for a file of ``kind`` trained on a ``family`` base model.

    ``family`` is conceptor's ("sd1", "sd2", "sdxl", "sd3", "flux"); an SD2 model with
    ``prediction_type="v_prediction"`` is the 768-v architecture, a Flux base whose name says "schnell" is
    schnell. ``started_at``/``finished_at`` are unix seconds (finished defaults to now). ``config`` is the
    resolved run config as a dict; it is stored as JSON under ``conceptor.config``. ``adapter`` (lora, dora, loha,
    lokr) is told as LyCORIS tells it to kohya-style managers: ``ss_network_module`` lycoris.kohya and
    ``ss_network_args`` {"algo": ..., "dora_wd": ..., "factor": ...}.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    family = _family(family, prediction_type, base_model)
    architecture, base_version = _ARCH[family]
    finished = time.time() if finished_at is None else float(finished_at)
    reso = _resolution(resolution, family)
    name = model_name(base_model, keep_paths) if base_model else None
    out_name = output_name if keep_paths or output_name is None else _scrub(output_name)
    meta: dict[str, Any] = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": architecture if kind == "checkpoint" else f"{architecture}/{kind}",
        "modelspec.implementation": _implementation(family, kind),
        "modelspec.implementation_version": f"conceptor/{__version__}",
        "modelspec.title": title or out_name or f"{_TITLE[kind]}@{finished}",  # kohya's fallback title
        "modelspec.resolution": f"{reso[0]}x{reso[1]}",
        # kohya: datetime.fromtimestamp(int(timestamp)).isoformat(), local time to the second
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished)).isoformat(),
        "modelspec.trigger_phrase": trigger_phrase,
        "modelspec.prediction_type": _prediction(family, prediction_type),
        "ss_base_model_version": base_version,
        "ss_v2": str(family.startswith("sd2")),  # A1111 tells SD2 LoRAs from SD1 ones by this
        "ss_sd_model_name": name,
        "ss_output_name": out_name,
        "ss_resolution": str(reso),  # kohya: str(args.resolution), a tuple: "(512, 512)"
        "ss_steps": steps,
        "ss_epoch": epoch,
        # kohya: str(time.time()), unix seconds with a fraction
        "ss_training_started_at": None if started_at is None else str(float(started_at)),
        "ss_training_finished_at": str(finished),
        "conceptor.version": __version__,
        "conceptor.base_model_hash": base_model_hash,
    }
    if kind == "lora":  # the network keys kohya's minimum metadata keeps (train_util.SS_METADATA_MINIMUM_KEYS)
        meta["ss_network_module"] = "networks.lora" if adapter == "lora" else "lycoris.kohya"
        if adapter != "lora":  # LyCORIS writes every arg as a string
            args = {"algo": "lora" if adapter == "dora" else adapter}
            args |= {"dora_wd": "True"} if adapter == "dora" else {}
            args |= {"factor": str(lokr_factor)} if adapter == "lokr" and lokr_factor is not None else {}
            meta["ss_network_args"] = json.dumps(args)
        meta["ss_network_dim"] = None if rank is None else int(rank)
        meta["ss_network_alpha"] = None if alpha is None and rank is None else float(rank if alpha is None else alpha)
    if tag_frequency is not None:
        freq = tag_frequency if keep_paths else scrub_paths(tag_frequency)  # kohya keys datasets by folder name
        meta["ss_tag_frequency"] = json.dumps({str(d): {str(t): int(n) for t, n in tags.items()}
                                               for d, tags in freq.items()})
    if config is not None:
        meta["conceptor.config"] = json.dumps(config if keep_paths else scrub_paths(config), default=str)
    return {k: _text(v) for k, v in meta.items() if v is not None}


_TITLE = {"lora": "LoRA", "textual-inversion": "TextualInversion", "checkpoint": "Checkpoint"}


def _family(family: str, prediction_type: str | None, base_model: str | None) -> str:
    if family not in _ARCH:
        raise ValueError(f"unknown model family {family!r}; one of {', '.join(_ARCH)}")
    if family == "sd2" and prediction_type in ("v_prediction", "v"):
        return "sd2-v"
    if family == "flux" and base_model and "schnell" in base_model.lower():
        return "flux-schnell"
    return family


def _implementation(family: str, kind: str) -> str:
    if family.startswith("flux"):
        return _IMPL_FLUX
    if (kind == "lora" and family == "sdxl") or kind != "lora":
        return _IMPL_SGM
    return "diffusers"


def _prediction(family: str, prediction_type: str | None) -> str | None:
    # kohya writes "epsilon" or "v" for the UNet families and nothing for the flow-matching ones
    if family.startswith(("flux", "sd3")):
        return None
    return "v" if prediction_type in ("v_prediction", "v") or family == "sd2-v" else "epsilon"


def _resolution(resolution: int | tuple[int, int] | None, family: str) -> tuple[int, int]:
    if resolution is None:
        side = _DEFAULT_RESOLUTION.get(family, 512)
        return side, side
    if isinstance(resolution, int):
        return resolution, resolution
    return int(resolution[0]), int(resolution[1])


def _text(value: Any) -> str:
    """A header value: the format allows only strings. Mappings and lists become JSON, bools "True"/"False"
    (what kohya's str() gives and A1111 compares with)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def merge_metadata(own: Mapping[str, str], extra: Mapping[str, Any] | None) -> dict[str, str]:
    """A writer's own keys plus the caller's. The writer's win: they describe the bytes (``format``, the
    token, the family) and a loader that trusted a wrong one would misread the file."""
    return {**{str(k): _text(v) for k, v in (extra or {}).items()}, **own}


def model_name(ref: str, keep_paths: bool = False) -> str:
    """``ss_sd_model_name``: a hub id as it is, a local folder or file by its name (kohya: os.path.basename
    of a path that exists). A trailing slash does not make the name empty."""
    if keep_paths:
        return ref
    return _scrub(ref) if _is_path(ref) else ref


_HOME = os.path.expanduser("~")
_DRIVE = re.compile(r"[A-Za-z]:[\\/]")  # C:\ or C:/ (a bare "a:b" is not a path)


def _is_path(s: str) -> bool:
    if not s or "\n" in s:
        return False
    if s.startswith(("/", "~", "./", "../", ".\\", "\\\\")) or _DRIVE.match(s):
        return True
    if "/" not in s and "\\" not in s:
        return False
    try:  # a relative path that names something here ("models/sd"); "org/model" hub ids do not exist locally
        return Path(s).exists()
    except (OSError, ValueError):
        return False


def _last(path: str) -> str:
    stripped = path.rstrip("/\\")
    if not stripped:  # the root names no one
        return path
    pure = PureWindowsPath(stripped) if "\\" in stripped or _DRIVE.match(stripped) else PurePosixPath(stripped)
    return pure.name or stripped


# A path inside a longer string (an error message, a command line): every run of non-space characters that
# starts at the filesystem root or the home folder.
_EMBEDDED = re.compile(r"(?:(?<=[\s=:'\"(,])|^)(?:~|/|[A-Za-z]:\\)[^\s'\",;)]*")


def _scrub(s: str) -> str:
    if _is_path(s):
        return _last(s)
    if "/" in s or "\\" in s or "~" in s:  # text with paths in it: reduce each one
        s = _EMBEDDED.sub(lambda m: _last(m.group(0)) if len(m.group(0)) > 1 else m.group(0), s)
    # the home folder glued to other text ("file:///home/me"): what is left of it still names the user
    return s.replace(_HOME, "~") if len(_HOME) > 1 else s


def scrub_paths(obj: Any) -> Any:
    """``obj`` with every string that is a path (absolute, under the home folder, or relative and existing)
    replaced by its last component, in nested dicts (keys too), lists and tuples. Other values as they are."""
    if isinstance(obj, str):
        return _scrub(obj)
    if isinstance(obj, os.PathLike):
        return _last(os.fspath(obj))
    if isinstance(obj, Mapping):
        return {scrub_paths(k) if isinstance(k, str) else k: scrub_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub_paths(v) for v in obj) if isinstance(obj, list) else tuple(scrub_paths(v) for v in obj)
    return obj


def weights_hash(weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A short sha256 (16 hex digits) of a model's weights: names and fp32 values, in sorted key order.

    The same algorithm as data/cache.py's ``fingerprint`` (which calls this), so a module and its state dict
    hash alike, and an fp16 copy hashes like its exact fp32 upcast. One tensor is copied at a time; hash the
    base model before quantizing it (a packed nf4 weight hashes as its storage, not its values)."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        if not isinstance(t, torch.Tensor):  # non-tensor extras some state dicts carry (e.g. _extra_state)
            continue
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

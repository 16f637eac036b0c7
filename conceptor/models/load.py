"""Load a model (SD 1/2/XL, SD 3/3.5, Flux.1) from a hub id, a diffusers folder or one .safetensors file.

Everything downstream (methods, sampling, eval) sees one typed ``Components`` object, never a path.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ConceptorError
from ..families import PIPELINE_FAMILIES
from ..formats.ldm_checkpoint import FAMILIES  # the one table of families
from ..toyworld import MODEL_FOLDER  # paths only: the package imports nothing

log = logging.getLogger("conceptor")

# Hub repos whose configs (and tokenizer) describe each family's single-file checkpoints.
FAMILY_CONFIG_REPOS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DEFAULT_GUIDANCE = 7.5  # SD's classifier-free guidance scale, for models that do not say otherwise
# A model folder may carry conceptor's sampling defaults, measured for that model (diffusers ignores the
# file). The bundled toy model does: at SD's 7.5 its colours oversaturate (purple drawn pink).
SAMPLING_FILE = "conceptor.json"


@dataclass
class Components:
    """The parts of a text-to-image model that training and sampling need.

    UNet families (sd1, sd2, sdxl) fill ``unet``; flow-matching transformers (sd3, flux) fill ``transformer``
    and their family layer (``flow``) says how to encode text and call it. SD3 has three text encoders
    (CLIP-L, CLIP-G, T5-XXL), Flux two (CLIP-L for the pooled embedding, T5-XXL).
    """

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module | None
    scheduler: Any  # the training noise scheduler (DDPM over the model's betas; None for flow families)
    scheduler_config: dict  # the model's own scheduler config, as shipped: samplers start from it
    family: str  # "sd1" | "sd2" | "sdxl" | "sd3" | "flux"
    prediction_type: str  # "epsilon" | "v_prediction" | "flow" (velocity eps - x0)
    source: str
    tokenizer_2: Any = None  # SDXL: the OpenCLIP-bigG tokenizer and text encoder (with projection: pooled)
    text_encoder_2: torch.nn.Module | None = None
    sampling: dict = field(default_factory=dict)  # the folder's SAMPLING_FILE, if it has one
    transformer: torch.nn.Module | None = None
    tokenizer_3: Any = None  # SD3's T5
    text_encoder_3: torch.nn.Module | None = None
    max_sequence_length: int = 77  # T5 token slots of the flow families (their pipelines' defaults)

    @property
    def flow(self):
        """The flow-matching family layer (families/), or None for a UNet model."""
        from ..families import flow_family

        return flow_family(self.family)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet or the transformer: what training adapts and sampling calls."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def denoiser_name(self) -> str:
        return "unet" if self.unet is not None else "transformer"

    @property
    def default_guidance(self) -> float:
        if "guidance" in self.sampling:
            return float(self.sampling["guidance"])
        return self.flow.guidance_default(self) if self.flow is not None else DEFAULT_GUIDANCE

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]

    @property
    def clip_encoders(self) -> list[tuple[Any, torch.nn.Module]]:
        """(tokenizer, text encoder) of each CLIP encoder: what textual inversion and text-encoder LoRAs train.
        T5-XXL (SD3's third encoder, Flux's second) stays frozen, as in every trainer: 4.7B parameters."""
        pairs = [(self.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None and self.family != "flux":
            pairs.append((self.tokenizer_2, self.text_encoder_2))
        return pairs

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        if "resolution" in self.sampling:
            return int(self.sampling["resolution"])
        size = self.denoiser.config.get("sample_size")
        # Flux's config has no size; its pipeline's default is 128 latents x 8 = 1024 px.
        return int(size) * self.vae_scale_factor if size else 1024

    def frozen(self) -> "Components":
        """Freeze every weight (methods then switch on exactly what they train)."""
        for m in (*self.text_encoders, self.vae, self.denoiser):
            m.requires_grad_(False)
            m.eval()
        return self


def quiet_libraries() -> None:
    """Silence load-time progress bars and warnings of diffusers/transformers; ours are the ones users read."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # bitsandbytes (the --quantize extra) is imported by diffusers when installed and logs a missing optional
    # CPU kernel package on every start; the kernels it does have are the ones --quantize uses.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def detect_family(text_encoder_config: Any) -> str:
    """SD1 uses OpenAI CLIP ViT-L (768 wide, quick_gelu); SD2 uses OpenCLIP ViT-H (1024 wide, gelu)."""
    hidden = text_encoder_config.hidden_size
    if hidden == 768:
        return "sd1"
    if hidden == 1024:
        return "sd2"
    # Tiny/custom models: the activation tells the two CLIP families apart.
    return "sd1" if getattr(text_encoder_config, "hidden_act", "quick_gelu") == "quick_gelu" else "sd2"


def load_components(model: str, *, model_config: str | None = None, family: str | None = None,
                    revision: str | None = None, variant: str | None = None,
                    dtype: torch.dtype = torch.float32) -> Components:
    """Load ``model``: an existing diffusers folder, a ``.safetensors``/``.ckpt`` single file, or a hub id.

    Hub ids go through the normal Hugging Face cache and respect ``HF_HUB_OFFLINE``.
    A single file needs configs: ``model_config`` (a local diffusers folder) or a ``family`` hint.
    """
    quiet_libraries()
    path = Path(model).expanduser()
    if path.is_dir():
        index = _read_index(path)
        if index.get("_class_name") in PIPELINE_FAMILIES:
            components = load_flow_folder(str(path), index, None, None, dtype, source=str(path), local_only=True)
            components.sampling = read_sampling_defaults(path)
            # a model trained with fewer T5 slots than its pipeline's default says so (the toy Flux model)
            components.max_sequence_length = int(components.sampling.get("max_sequence_length",
                                                                         components.max_sequence_length))
            return components
        if not (path / "unet").is_dir() or not (path / "text_encoder").is_dir():
            raise ConceptorError(
                f"model folder {model} is not a diffusers Stable Diffusion, SD3 or Flux folder (no unet/ or "
                "transformer/ with text_encoder/); pass a pipeline folder, a .safetensors checkpoint or a hub id")
        components = _load_folder(str(path), None, None, dtype, source=str(path), local_only=True)
        components.sampling = read_sampling_defaults(path)
        return components
    if path.suffix.lower() in (".safetensors", ".ckpt"):
        if not path.is_file():
            raise ConceptorError(f"model file {model} does not exist")
        return _load_single_file(path, model_config, family, dtype)
    if not _HUB_ID.match(model) or model.startswith((".", "~")):
        raise ConceptorError(f"model path {model} does not exist (and it is not a hub id like org/name)")
    index = _hub_index(model, revision)
    if index.get("_class_name") in PIPELINE_FAMILIES:
        return load_flow_folder(model, index, revision, variant, dtype, source=model, local_only=False)
    return _load_folder(model, revision, variant, dtype, source=model, local_only=False)


def _read_index(folder: Path) -> dict:
    file = folder / "model_index.json"
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        raise ConceptorError(f"{file} is not valid JSON; the model folder is damaged") from None


def _hub_index(repo: str, revision: str | None) -> dict:
    """A hub model's model_index.json (from the cache when offline); {} when it cannot be read, so the
    loader below reports the problem in its own words."""
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(repo, "model_index.json", revision=revision)).read_text())
    except Exception:  # offline and not cached, no such repo, not a pipeline: the loader below says which
        return {}


def load_flow_folder(where: str, index: dict, revision: str | None, variant: str | None, dtype: torch.dtype,
                     source: str, local_only: bool, transformer: torch.nn.Module | None = None) -> Components:
    """An SD3 or Flux pipeline folder (or hub id), every part with the class its model_index.json names.
    ``transformer`` replaces the folder's own (a transformer-only single file)."""
    from ..families import PIPELINE_FAMILIES
    from ..families.flow import load_parts

    family = PIPELINE_FAMILIES[index["_class_name"]]
    common: dict[str, Any] = {"revision": revision, "variant": variant}
    if local_only:
        common["local_files_only"] = True
    try:
        parts = load_parts(where, index, common, dtype, skip=("transformer",) if transformer is not None else ())
    except (AttributeError, ImportError, TypeError) as e:  # model_index.json names a class no library has
        raise ConceptorError(f"could not load model {source}: its model_index.json names a part class that "
                             f"diffusers/transformers do not have ({str(e).splitlines()[0]})") from None
    except (OSError, ValueError, json.JSONDecodeError) as e:
        hint = ("it is not in the local cache and HF_HUB_OFFLINE is set"
                if os.environ.get("HF_HUB_OFFLINE") == "1" and not local_only else str(e).splitlines()[0])
        raise ConceptorError(f"could not load model {source}: {hint}") from None
    if transformer is not None:
        parts["transformer"] = transformer
    missing = [p for p in ("tokenizer", "text_encoder", "transformer", "vae") if parts.get(p) is None]
    if missing:
        raise ConceptorError(f"model {source} lacks {', '.join(missing)}; a {family} pipeline needs them")
    scheduler_config = parts.pop("scheduler") or {}
    guided = bool(parts["transformer"].config.get("guidance_embeds", False))
    # The pipelines' own T5 lengths: SD3 256, Flux.1-dev 512, schnell 256.
    max_len = 512 if family == "flux" and guided else 256
    return Components(**parts, unet=None, scheduler=None, scheduler_config=scheduler_config, family=family,
                      prediction_type="flow", source=source, max_sequence_length=max_len)


def read_sampling_defaults(folder: Path) -> dict:
    file = folder / SAMPLING_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
        if not isinstance(data, dict) or float(data.get("guidance", DEFAULT_GUIDANCE)) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        raise ConceptorError(f"{file} is not a valid sampling-defaults file (a JSON object with a positive "
                             f"\"guidance\"); fix or delete it") from None
    return data


def _load_folder(where: str, revision: str | None, variant: str | None, dtype: torch.dtype,
                 source: str, local_only: bool) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common: dict[str, Any] = {"revision": revision}
    if local_only:
        common["local_files_only"] = True
    try:
        tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **common)
        text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", torch_dtype=dtype,
                                                     **common)
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=dtype, variant=variant, **common)
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", torch_dtype=dtype,
                                                    variant=variant, **common)
        scheduler_config = dict(DDPMScheduler.load_config(where, subfolder="scheduler", **common))
        tokenizer_2 = text_encoder_2 = None
        if _has_part(where, "text_encoder_2", common):
            from transformers import CLIPTextModelWithProjection

            tokenizer_2 = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer_2", **common)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(where, subfolder="text_encoder_2",
                                                                         torch_dtype=dtype, **common)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        hint = ("it is not in the local cache and HF_HUB_OFFLINE is set"
                if os.environ.get("HF_HUB_OFFLINE") == "1" and not local_only else str(e).splitlines()[0])
        raise ConceptorError(f"could not load model {source}: {hint}") from None
    return _assemble(tokenizer, text_encoder, vae, unet, scheduler_config, source, tokenizer_2, text_encoder_2)


def _has_part(where: str, part: str, common: dict) -> bool:
    """Whether the pipeline lists ``part`` (SDXL's second text encoder) in its model_index.json."""
    local = Path(where) / "model_index.json"
    if local.is_file():
        index = json.loads(local.read_text())
    else:
        from huggingface_hub import hf_hub_download

        index = json.loads(Path(hf_hub_download(where, "model_index.json", **{
            k: v for k, v in common.items() if k in ("revision", "local_files_only")})).read_text())
    return bool(index.get(part)) and index.get(part)[0] is not None


def _load_single_file(path: Path, model_config: str | None, family: str | None,
                      dtype: torch.dtype) -> Components:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if path.suffix.lower() == ".ckpt":
        # from_single_file would unpickle it; we only ever read pickles with weights_only=True.
        raise ConceptorError(f"{path.name} is a pickle (.ckpt); convert it to .safetensors from a trusted "
                             "source first, pickles can run code when loaded")
    flow = single_file_flow_family(path)
    if flow is not None:
        return _load_flow_single_file(path, flow, model_config, dtype)
    if model_config is None:
        if family is None:
            raise ConceptorError(f"single-file checkpoint {path.name} needs configs: pass --model-config "
                                 "DIR (a local diffusers folder of the same family) or --family sd1|sd2")
        if family not in FAMILIES:
            raise ConceptorError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
        model_config = FAMILY_CONFIG_REPOS[family]
    local = Path(model_config).is_dir()
    xl = family == "sdxl" or (local and (Path(model_config) / "text_encoder_2").is_dir()) or (
        not local and model_config == FAMILY_CONFIG_REPOS["sdxl"])
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    extra = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_single_file(
            str(path), config=model_config, local_files_only=local or os.environ.get("HF_HUB_OFFLINE") == "1",
            torch_dtype=dtype, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConceptorError(f"could not load checkpoint {path.name} with configs from {model_config}: "
                             f"{str(e).splitlines()[0]}") from None
    return _assemble(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, dict(pipe.scheduler.config), str(path),
                     getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))


# Keys that only one family's transformer has, in the original (BFL/Stability) and in diffusers' naming.
_FLOW_KEYS = {"flux": ("double_blocks.", "single_transformer_blocks."), "sd3": ("joint_blocks.", "context_embedder.")}


def single_file_flow_family(path: Path) -> str | None:
    """"flux" or "sd3" when the file holds such a transformer (read from the header's key names alone)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception:  # not a safetensors file: the UNet loader below reports it
        return None
    for family, marks in _FLOW_KEYS.items():
        if any(m in k for k in keys for m in marks):
            return family
    return None


def _load_flow_single_file(path: Path, family: str, model_config: str | None, dtype: torch.dtype) -> Components:
    """A transformer-only SD3/Flux file with the rest (text encoders, VAE, configs) from ``model_config``."""
    import diffusers

    title = {"flux": "Flux", "sd3": "SD3"}[family]
    if model_config is None or not Path(model_config).is_dir():
        raise ConceptorError(f"{path.name} is a {title} transformer without text encoders or VAE; pass "
                             f"--model-config DIR, a local diffusers {title} folder to take them and the configs from")
    index = _read_index(Path(model_config))
    if PIPELINE_FAMILIES.get(index.get("_class_name")) != family:
        raise ConceptorError(f"--model-config {model_config} is not a {title} pipeline folder but {path.name} is a "
                             f"{title} transformer; pass a folder of the same family")
    cls = getattr(diffusers, index["transformer"][1])
    config = cls.load_config(model_config, subfolder="transformer")
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            diffusers_names = any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in f.keys())
        if diffusers_names:
            transformer = cls.from_config(config)
            transformer.load_state_dict(load_file(str(path)), strict=True)
            transformer.to(dtype)
        else:
            transformer = cls.from_single_file(str(path), config=model_config, subfolder="transformer",
                                               torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConceptorError(f"could not load {path.name} as the transformer of {model_config}: "
                             f"{str(e).splitlines()[0]}") from None
    return load_flow_folder(model_config, index, None, None, dtype, source=str(path), local_only=True,
                            transformer=transformer)


def _assemble(tokenizer, text_encoder, vae, unet, scheduler_config: dict, source: str, tokenizer_2=None,
              text_encoder_2=None) -> Components:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler_config)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ConceptorError(f"model {source} predicts {prediction_type!r}; conceptor trains epsilon and "
                             "v_prediction models")
    family = "sdxl" if text_encoder_2 is not None else detect_family(text_encoder.config)
    return Components(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler,
                      scheduler_config=scheduler_config, family=family, prediction_type=prediction_type,
                      source=source, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)


def bundled_model_path() -> Path | None:
    """The small pretrained toy-world model shipped in the package, if this install has it."""
    return MODEL_FOLDER if (MODEL_FOLDER / "model_index.json").is_file() else None


def resolve_model(cfg: ModelConfig) -> Components:
    """Load the configured model; with none given, the bundled toy model (and say so)."""
    name = cfg.model
    if name is None:
        bundled = bundled_model_path()
        if bundled is None:
            raise ConceptorError("no --model given; pass a hub id (runwayml/stable-diffusion-v1-5), a diffusers "
                                 "folder or a .safetensors checkpoint")
        log.warning("no --model given: using the bundled toy model (%s); pass --model "
                    "runwayml/stable-diffusion-v1-5 (or a folder/.safetensors) for a real one", bundled)
        name = str(bundled)
    components = load_components(name, model_config=cfg.model_config, family=cfg.family, revision=cfg.revision,
                                 variant=cfg.variant)
    if cfg.vae:
        components.vae = load_vae(cfg.vae)
    return components


def load_vae(where: str):
    """An AutoencoderKL from a folder (or its parent with vae/) or a hub id, replacing the model's own."""
    from diffusers import AutoencoderKL

    p = Path(where)
    sub = "vae" if (p / "vae" / "config.json").is_file() else None
    try:
        # fp32 whatever the file holds: the loop casts to the run's precision itself
        return AutoencoderKL.from_pretrained(where, subfolder=sub, local_files_only=p.exists(),
                                             torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConceptorError(f"could not load --vae {where}: {str(e).splitlines()[0]}") from None

"""Public entry points: train(config), load(...)/generate(...), convert_embedding(...)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image

from .compat import check_adapter_stack
from .config import ModelConfig, RunConfig
from .errors import ConceptorError
from .fileio import atomic_path, write_text
from .models.load import Components, bundled_model_path, load_vae, resolve_model  # noqa: F401 (public)

log = logging.getLogger("conceptor")


def train(cfg: RunConfig, components: Components | None = None, scorer=None):
    """Run one training job described by ``cfg``; returns a TrainResult (output folder, files, last loss).
    ``scorer``: what --eval-every measures besides the validation loss (``conceptor.train`` builds it from the
    config: toy-world evaluator, CLIP/DINO)."""
    from .methods import get_method
    from .training.loop import train as run_loop
    from .training.output import check_output
    from .training.preflight import check_memory

    method = get_method(cfg.method)
    check_output(cfg)  # before minutes of model loading and class images, not after
    if cfg.data.dataset_file():  # its syntax, options and paths too (images and captions are read at set-up)
        from .data.dataset_config import read_dataset_config

        read_dataset_config(cfg.data.dataset)
    if components is None:
        check_memory(cfg)  # SD3/Flux: the peak-memory estimate, and a stop when it cannot fit, before any weight
    if cfg.lora is not None and cfg.lora.enabled:
        check_adapter_stack()
    return run_loop(method, components if components is not None else resolve_model(cfg.model), cfg, scorer)


# -- generation ----------------------------------------------------------------------------------

def parse_embedding_arg(arg: str) -> list[tuple[Path, str | None]]:
    """``FILE`` or ``FILE:TOKEN``; a run folder means its embeddings: learned_embeds.safetensors, or one
    learned_embeds-<token>.safetensors per token of a run that trained several."""
    path, token = arg, None
    if ":" in arg and not Path(arg).exists():
        path, token = arg.rsplit(":", 1)
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.glob("learned_embeds*.safetensors") if "-steps-" not in f.name)
        if not files:
            raise ConceptorError(f"{p} holds no learned_embeds*.safetensors; finish or resume the run first")
        if token is not None and len(files) > 1:
            raise ConceptorError(f"{p} holds {len(files)} embeddings; name one file instead of FOLDER:TOKEN")
        return [(f, token or None) for f in files]
    if not p.is_file():
        raise ConceptorError(f"embedding file {p} does not exist")
    return [(p, token or None)]


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:SCALE``; a folder means its pytorch_lora_weights.safetensors (and, when the run trained
    tokens too, its learned_embeds*.safetensors: ``load`` adds them)."""
    import math

    path, scale = arg, 1.0
    if ":" in arg and not Path(arg).exists():
        head, tail = arg.rsplit(":", 1)
        try:
            path, scale = head, float(tail)
        except ValueError:
            raise ConceptorError(f"LoRA {arg}: the part after ':' must be a scale like 0.8") from None
        if not math.isfinite(scale):  # float() takes "nan" and "inf"; merged, they turn every weight into NaN
            raise ConceptorError(f"LoRA {arg}: the scale {tail} is not a finite number; give one like 0.8")
    p = Path(path)
    if p.is_dir():
        p = p / "pytorch_lora_weights.safetensors"
    if not p.is_file():
        raise ConceptorError(f"LoRA file {p} does not exist")
    return p, scale


class Model:
    """A loaded model plus any embeddings, ready to generate (KerasCV-style ``text_to_image`` too)."""

    def __init__(self, components: Components):
        self.components = components
        self.tokens: dict[str, int] = {}

    @property
    def default_guidance(self) -> float:
        """The guidance scale generate uses when given none: the model's own (7.5, or its conceptor.json's)."""
        return self.components.default_guidance

    def add_embedding(self, path: str | Path, token: str | None = None) -> str:
        """Load a textual-inversion file (diffusers, A1111, kohya, SDXL clip_l/clip_g, or every embedding bundled
        in a LoRA file); returns its (first) token. ``token`` renames a one-embedding file or picks one of a
        bundle's."""
        from .formats.embeddings import read_embedding, read_embeddings
        from .models.tokens import add_tokens

        embeddings = [read_embedding(path, token=token)] if token else read_embeddings(path)
        c = self.components
        pair = len(c.clip_encoders) == 2  # SDXL and SD3 have CLIP-L and CLIP-G; SD 1/2 and Flux one CLIP
        for emb in embeddings:
            if pair != (emb.vectors_2 is not None):
                kind = "SDXL (clip_l + clip_g)" if emb.vectors_2 is not None else "SD 1/2 (one CLIP encoder)"
                model = {"sd1": "SD 1/2", "sd2": "SD 1/2", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}[c.family]
                raise ConceptorError(f"{Path(path).name} is an {kind.split(' (')[0]} embedding but the model is "
                                     f"{model}, which takes {'clip_l + clip_g' if pair else 'one-CLIP'} embeddings; "
                                     "use one made for this model family")
        for emb in embeddings:
            for (tok, te), v in zip(c.clip_encoders, (emb.vectors, emb.vectors_2)):
                add_tokens(tok, te, emb.token, v.to(te.dtype))
            self.tokens[emb.token] = emb.num_vectors
        return embeddings[0].token

    def add_lora(self, path: str | Path, scale: float = 1.0) -> int:
        """Merge a LoRA (diffusers/PEFT or kohya file) into the weights at ``scale``; LoRAs add up."""
        import math

        from .formats.lora import apply_lora_to, read_lora
        from .models.adapters import trainable_text_encoders

        if not math.isfinite(scale):  # checked before any weight changes: a NaN scale would poison the model
            raise ConceptorError(f"LoRA scale {scale} for {Path(path).name} is not a finite number; give one like 0.8")
        c = self.components
        # the CLIP encoders by their file names: Flux's text_encoder_2 is its T5, which no LoRA here targets
        modules = {c.denoiser_name: c.denoiser, **trainable_text_encoders(c)}
        return apply_lora_to(read_lora(path), modules, scale)

    def generate(self, prompt: str, *, negative_prompt: str | None = None, num_images: int = 1, steps: int = 30,
                 guidance: float | None = None, scheduler: str = "ddim", seed: int | None = 0, width: int | None = None,
                 height: int | None = None, batch_size: int = 4, progress=None) -> list[Image.Image]:
        """``num_images`` images of ``prompt``; image i uses seed ``seed + i`` so each is reproducible alone.

        ``guidance`` None is the model's default: 7.5, or what its folder's conceptor.json says."""
        from .sampling.pipeline import check_sampling, sample

        check_sampling(steps=steps, guidance=guidance, width=width, height=height, batch_size=batch_size,
                       scheduler=scheduler, num_images=num_images, seed=seed)
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
        return sample(self.components, [prompt] * num_images, [seed + i for i in range(num_images)],
                      negative_prompt=negative_prompt, steps=steps, guidance=guidance, scheduler=scheduler,
                      width=width, height=height, batch_size=batch_size, progress=progress)

    def text_to_image(self, prompt: str, batch_size: int = 1, num_steps: int = 50,
                      unconditional_guidance_scale: float | None = None, seed: int | None = None) -> list[Image.Image]:
        """KerasCV's ``StableDiffusion.text_to_image`` signature, for users coming from the seeds."""
        return self.generate(prompt, num_images=batch_size, steps=num_steps,
                             guidance=unconditional_guidance_scale, seed=seed)


def load(model: str | None = None, embeddings: Iterable[str | Path] = (), *, loras: Iterable[str | Path] = (),
         device: str | None = None, dtype: torch.dtype = torch.float32, model_config: str | None = None,
         family: str | None = None, vae: str | None = None) -> Model:
    """Load a model (hub id, folder, .safetensors; None = bundled toy model), textual-inversion files and
    LoRAs (``FILE[:SCALE]``), so one prompt can use all of them."""
    parsed_loras = [parse_lora_arg(str(x)) for x in loras]  # a typo fails before the model loads
    components = resolve_model(ModelConfig(model=model, model_config=model_config, family=family, vae=vae))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for m in (*components.text_encoders, components.vae, components.denoiser):
        m.to(device, dtype=dtype).eval()
    loaded = Model(components)
    from .formats.bundle import has_bundled_embeddings

    for (path, scale), arg in zip(parsed_loras, loras):
        loaded.add_lora(path, scale)
        folder = Path(str(arg).rsplit(":", 1)[0]) if not Path(str(arg)).exists() else Path(str(arg))
        if folder.is_dir():  # a pivotal-tuning run: its tokens come with its LoRA
            for emb in sorted(folder.glob("learned_embeds*.safetensors")):
                if "-steps-" not in emb.name:
                    loaded.add_embedding(emb)
        elif has_bundled_embeddings(path):  # a LoRA with its embeddings inside (A1111's bundle_emb)
            loaded.add_embedding(path)
    for e in embeddings:
        for path, token in parse_embedding_arg(str(e)):
            loaded.add_embedding(path, token)
    return loaded


def generate(prompt: str, model: str | None = None, embeddings: Sequence[str | Path] = (), *,
             loras: Sequence[str | Path] = (), output: str | Path | None = None, overwrite: bool = False,
             **kwargs) -> list[Image.Image]:
    """One call: load, generate, and (with ``output``) write PNGs, a grid and the settings used."""
    if output is not None:
        check_image_output(output, image_names(kwargs.get("num_images", 1), kwargs.get("seed", 0)), overwrite)
    images = load(model, embeddings, loras=loras).generate(prompt, **kwargs)
    if output is not None:
        save_images(images, Path(output), {"prompt": prompt, "model": model, "loras": [str(x) for x in loras],
                                           "embeddings": [str(e) for e in embeddings], **kwargs}, overwrite)
    return images


def image_names(num_images: int, seed: int | None) -> list[str]:
    """What ``save_images`` writes for ``num_images`` images from ``seed``."""
    seed = seed or 0
    return [f"{i:03d}-seed{seed + i}.png" for i in range(num_images)] + ["grid.png"] * (num_images > 1) + \
        ["generation.json"]


def check_image_output(output: str | Path, names: list[str], overwrite: bool = False) -> None:
    """Refuse to replace files an earlier call left in ``output`` unless ``overwrite`` (callers check before
    generating, so a refusal costs nothing); never anything that is not a regular file."""
    from .fileio import check_target

    output = Path(output)
    check_target(output, want_dir=True)
    taken = [n for n in names if os.path.lexists(output / n)]
    for n in taken:
        check_target(output / n)
    if taken and not overwrite:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise ConceptorError(f"--output {output} already holds {taken[0]}{more} from an earlier run; choose "
                             "another --output or pass --overwrite to replace those files")


def generation_text(settings: dict, i: int, size: tuple[int, int]) -> str:
    """Image ``i``'s settings in A1111's "parameters" layout (formats/png_info.py): names, never paths."""
    from ._version import __version__
    from .formats.png_info import SAMPLER_LABELS, format_parameters

    def names(key: str) -> str | None:
        return ", ".join(Path(str(x)).name for x in settings.get(key) or settings.get(key + "s") or []) or None

    model = settings.get("model")
    return format_parameters(settings["prompt"], settings.get("negative_prompt"), {
        "Steps": settings.get("steps"), "Sampler": SAMPLER_LABELS.get(settings.get("scheduler") or "ddim"),
        "CFG scale": settings.get("guidance"), "Seed": (settings.get("seed") or 0) + i, "Size": f"{size[0]}x{size[1]}",
        "Model": Path(str(model)).name if model and not _is_bundled(model) else "conceptor-toyworld",
        "Conceptor LoRAs": names("lora"),
        "Conceptor embeddings": names("embedding"), "Version": f"conceptor {__version__}"})


def _is_bundled(model) -> bool:
    bundled = bundled_model_path()
    return bundled is not None and Path(str(model)).resolve() == bundled.resolve()


def save_images(images: list[Image.Image], output: Path, settings: dict, overwrite: bool = False) -> list[Path]:
    """Write ``NNN-seedS.png`` per image (its settings inside, as A1111 writes them), ``grid.png`` and
    ``generation.json``, refusing to replace files that are there unless ``overwrite``."""
    from .formats.png_info import png_info
    from .sampling.grid import make_grid

    names = image_names(len(images), settings.get("seed"))
    check_image_output(output, names, overwrite)
    paths = []
    for i, im in enumerate(images):
        path = Path(output) / names[i]
        with atomic_path(path) as tmp:
            im.save(tmp, format="PNG", pnginfo=png_info(generation_text(settings, i, im.size)))
        paths.append(path)
    if len(images) > 1:
        cols = min(len(images), 4)
        with atomic_path(output / "grid.png") as tmp:
            make_grid(images, cols).save(tmp, format="PNG")
        paths.append(output / "grid.png")
    write_text(output / "generation.json", json.dumps(settings, indent=2, default=str))
    return paths


def convert_embedding(src: str | Path, dst: str | Path, to: str, token: str | None = None):
    """Rewrite a textual-inversion file in another tool's format (diffusers, a1111, kohya)."""
    from .formats.embeddings import convert_embedding as convert

    return convert(src, dst, to=to, token=token)


def convert_lora(src: str | Path, dst: str | Path, to: str):
    """Rewrite a LoRA file in another tool's layout (diffusers/PEFT or kohya); returns the layers it read."""
    from .formats.lora import read_lora, write_lora
    from .formats.safe_load import refuse_same_file

    refuse_same_file(src, dst)
    lora = read_lora(src)
    write_lora(lora, dst, to)
    return lora

"""Real-model concept metrics, the DreamBooth protocol (Ruiz et al. 2022, "DreamBooth", sec. 4.1):

- CLIP-T: mean cosine between the CLIP text embedding of each prompt and the CLIP image embedding of the images
  generated from it (prompt fidelity; Radford et al. 2021 for CLIP, Hessel et al. 2021 for CLIPScore's form);
- CLIP-I: mean pairwise cosine between CLIP image embeddings of generated and real (training) images;
- DINO: the same with the CLS token of a self-supervised ViT-S/16 (Caron et al. 2021). DreamBooth prefers it to
  CLIP-I for subject fidelity because it is not trained to ignore instance details that share a caption;
- prior drift (DreamBooth/pivotal runs): 1 - mean cosine between the tuned and the base model's class-prompt
  images on the SAME seeds, paired image by image. 0 = the class prior is untouched; larger = the tuned model
  draws something else for the bare class (the language drift that prior preservation, sec. 3.3, fights).

Models come from a local folder or the hub cache only (``local_files_only``): evaluation never downloads.
Every embedding is computed under ``no_grad`` in eval mode and L2-normalised, so a score is a deterministic
function of the images and the model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from ..errors import ConceptorError

BATCH = 16  # images per forward pass: ViT-L/14 at 224 px fits easily, and results do not depend on it


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(kind: str, flag: str, name_or_folder: str | Path, build):
    """Run ``build(path, local_files_only=True)``; a missing or wrong model becomes one line saying what to do."""
    name = str(name_or_folder)
    folder = Path(name).expanduser()
    if not folder.is_dir() and (folder.suffix or name.startswith((".", "/", "~")) or name.count("/") > 1):
        # clearly meant as a path (a hub id is "owner/name"): saying "download it" would mislead
        raise ConceptorError(f"{kind} model folder {name} does not exist; pass an existing folder to {flag}")
    import transformers

    # as models.load.quiet_libraries does for the pipeline: no load-time bars or advisories on the user's screen
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model, processor = build(str(folder) if folder.is_dir() else name, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:  # transformers raises OSError for "not found locally"
        if folder.is_dir():
            raise ConceptorError(f"{name} is not a {kind} model folder ({str(e).splitlines()[0][:160]}); "
                                 f"pass a folder saved by transformers' save_pretrained to {flag}") from None
        raise ConceptorError(f"{kind} model {name} is not on this machine (not a folder, not in the hub cache); "
                             f"download it once with `huggingface-cli download {name}` or pass {flag} FOLDER"
                             ) from None
    # AutoModel loads anything: a CLIP folder given as DINO would fail later, deep in a forward pass
    if (kind == "DINO") == hasattr(model, "get_text_features"):
        raise ConceptorError(f"{name} holds a {model.config.model_type} model, not a {kind} one; pass a "
                             f"{'CLIP' if kind == 'CLIP' else 'DINO ViT (e.g. facebook/dino-vits16)'} to {flag}")
    return model, processor


def load_clip(name_or_folder: str | Path, device: str | None = None):
    """(CLIPModel, CLIPProcessor) from a folder or the hub cache, e.g. openai/clip-vit-large-patch14."""
    from transformers import CLIPModel, CLIPProcessor

    def build(path, **kw):
        return CLIPModel.from_pretrained(path, **kw), CLIPProcessor.from_pretrained(path, **kw)

    model, processor = _load("CLIP", "--clip-model", name_or_folder, build)
    return model.to(_device(device)).eval(), processor


def load_dino(name_or_folder: str | Path, device: str | None = None):
    """(ViT model, image processor) from a folder or the hub cache, e.g. facebook/dino-vits16 (a ViTModel)."""
    from transformers import AutoImageProcessor, AutoModel

    def build(path, **kw):
        return AutoModel.from_pretrained(path, **kw), AutoImageProcessor.from_pretrained(path, **kw)

    model, processor = _load("DINO", "--dino-model", name_or_folder, build)
    return model.to(_device(device)).eval(), processor


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _features(out) -> torch.Tensor:
    # transformers 4.x returns the projected tensor; 5.x an output whose pooler_output holds the projection
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _param(model) -> torch.nn.Parameter:
    return next(model.parameters())


@torch.no_grad()
def clip_image_embeddings(clip, images: Sequence[Image.Image]) -> torch.Tensor:
    model, processor = clip
    p = _param(model)
    out = []
    for i in range(0, len(images), BATCH):
        pixels = processor(images=[im.convert("RGB") for im in images[i:i + BATCH]], return_tensors="pt")
        out.append(_normalise(_features(model.get_image_features(
            pixel_values=pixels["pixel_values"].to(p.device, p.dtype)))).cpu())
    return torch.cat(out)


@torch.no_grad()
def clip_text_embeddings(clip, prompts: Sequence[str]) -> torch.Tensor:
    model, processor = clip
    device = _param(model).device
    out = []
    for i in range(0, len(prompts), BATCH):
        # CLIP's text tower sees at most its 77 positions; longer prompts are cut as CLIPScore does
        tokens = processor(text=list(prompts[i:i + BATCH]), padding=True, truncation=True, return_tensors="pt")
        out.append(_normalise(_features(model.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)))).cpu())
    return torch.cat(out)


@torch.no_grad()
def dino_embeddings(dino, images: Sequence[Image.Image]) -> torch.Tensor:
    """The CLS token of the last layer: the feature DINO's k-NN evaluation and DreamBooth's metric use."""
    model, processor = dino
    p = _param(model)
    out = []
    for i in range(0, len(images), BATCH):
        pixels = processor(images=[im.convert("RGB") for im in images[i:i + BATCH]], return_tensors="pt")
        hidden = model(pixel_values=pixels["pixel_values"].to(p.device, p.dtype)).last_hidden_state
        out.append(_normalise(hidden[:, 0]).cpu())
    return torch.cat(out)


def _need(what: str, items: Sequence, name: str) -> None:
    if not items:
        raise ConceptorError(f"{what} got no {name}; pass at least one")


def clip_t(clip, images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
    """Mean cosine of each image with its own prompt (one prompt per image, or one prompt for all)."""
    _need("CLIP-T", images, "images")
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) not in (1, len(images)):
        raise ConceptorError(f"CLIP-T got {len(images)} images but {len(prompts)} prompts; give one prompt per "
                             "image or a single prompt for all")
    text = clip_text_embeddings(clip, prompts)
    text = text.expand(len(images), -1) if len(prompts) == 1 else text
    return float((clip_image_embeddings(clip, images) * text).sum(-1).mean())


def clip_i(clip, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    """Mean over every (generated, real) pair of their CLIP image cosines."""
    _need("CLIP-I", images, "images"), _need("CLIP-I", references, "reference images")
    return float((clip_image_embeddings(clip, images) @ clip_image_embeddings(clip, references).T).mean())


def dino(dino, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:  # noqa: F811
    """Mean over every (generated, real) pair of their DINO CLS cosines."""
    _need("DINO", images, "images"), _need("DINO", references, "reference images")
    return float((dino_embeddings(dino, images) @ dino_embeddings(dino, references).T).mean())


dino_score = dino  # the same function under a name that a ``dino=`` keyword argument cannot shadow


def prior_drift(model, tuned_images: Sequence[Image.Image], base_images: Sequence[Image.Image]) -> float:
    """1 - mean cosine of tuned image i with base image i (same prompt, same seed); ``model`` is a CLIP or
    a DINO (model, processor) pair. 0 = the tuned model draws the class exactly as the base did."""
    _need("prior drift", tuned_images, "tuned images")
    if len(tuned_images) != len(base_images):
        raise ConceptorError(f"prior drift pairs images seed by seed but got {len(tuned_images)} tuned and "
                             f"{len(base_images)} base images; generate the same number with the same seeds")
    from transformers import CLIPModel

    embed = clip_image_embeddings if isinstance(model[0], CLIPModel) else dino_embeddings
    return float(1 - (embed(model, tuned_images) * embed(model, base_images)).sum(-1).mean())


Generate = Callable[[str, int, int], list]


def concept_metrics(generate: Generate, prompts: Sequence[str], references: Sequence[Image.Image], *, clip=None,
                    dino=None, class_prompt: str | None = None, base_generate: Generate | None = None,  # noqa: F811
                    n: int = 8, seed: int = 0, score_prompts: Sequence[str] | None = None) -> dict:
    """The DreamBooth table's numbers for a model: ``generate(prompt, n, seed)`` returns n images.

    Each prompt gets ``n`` images on seeds seed..seed+n-1 (prompt k starts at seed + 1000 k, so prompts do not
    share noise). CLIP-I/DINO pool all prompts' images against ``references``; CLIP-T scores each image against
    its prompt, or against ``score_prompts[k]`` when given (e.g. the prompt with a new token replaced by the class
    noun, since CLIP's text encoder has never seen the token). With ``class_prompt`` and ``base_generate``,
    ``prior_drift`` compares n class images of each model on the same seeds (DINO when given, else CLIP).
    Returns only the keys whose models were given, rounded to 4 places.
    """
    if clip is None and dino is None:
        raise ConceptorError("concept metrics need a CLIP or a DINO model; pass --clip-model or --dino-model")
    _need("concept metrics", prompts, "prompts")
    if n < 1:
        raise ConceptorError(f"concept metrics need at least 1 image per prompt, got n={n}")
    score_prompts = list(score_prompts or prompts)
    if len(score_prompts) != len(prompts):
        raise ConceptorError("score_prompts must name one CLIP text per generation prompt")
    images, texts = [], []
    for k, prompt in enumerate(prompts):
        got = list(generate(prompt, n, seed + 1000 * k))
        images += got
        texts += [score_prompts[k]] * len(got)
    out: dict = {}
    if clip is not None:
        out["clip_t"] = round(clip_t(clip, images, texts), 4)
        out["clip_i"] = round(clip_i(clip, images, references), 4)
    if dino is not None:
        out["dino"] = round(dino_score(dino, images, references), 4)
    if class_prompt and base_generate is not None:
        class_seed = seed + 77_000  # the class seeds eval.concept.prior_retention uses, so the two agree
        tuned, base = generate(class_prompt, n, class_seed), base_generate(class_prompt, n, class_seed)
        out["prior_drift"] = round(prior_drift(dino if dino is not None else clip, tuned, base), 4)
        out["prior_drift_model"] = "dino" if dino is not None else "clip"
    return out

"""The Train tab's form as a run config, and uploads checked before anything reaches a job.

Uploads are decoded with the CLI's own image reader (data/images.load_image: truncation, decompression
bombs, odd modes), limited in count, size and type, and copied into the new job's folder, which no other
browser is shown until the job exists. Nothing from an upload is ever unpickled: images and .txt captions only.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..data.images import CAPTION_EXTS, IMAGE_EXTS
from ..errors import ConceptorError
from .folders import BUNDLED, Folders, inside, list_models

MAX_UPLOAD_MB = 50
MAX_UPLOADS = 500
MAX_CAPTION_BYTES = 64_000


@dataclass
class TrainForm:
    """The fields of the Train tab (None / "" = the method's default)."""

    method: str
    model: str = BUNDLED
    folder: str = ""  # a folder (or finetune dataset) under the page's data folders, instead of uploads
    uploads: list[str] = field(default_factory=list)
    token: str = ""
    init_word: str = ""
    instance_prompt: str = ""
    class_prompt: str = ""
    steps: int = 500
    lr: float | None = None
    resolution: int | None = None
    lora: bool = False
    rank: int = 4
    adapter: str = "lora"  # lora, dora, loha, lokr: any but lora trains adapters without the LoRA box ticked
    vectors: int = 1
    batch_size: int | None = None
    validation_prompt: str = ""
    validation_every: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    mixed_precision: str = "no"
    name: str = ""


def upload_root() -> Path:
    """Where Gradio keeps uploaded files: an upload path from the browser must lie there."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def check_uploads(files: list[str], max_mb: float = MAX_UPLOAD_MB, max_files: int = MAX_UPLOADS) -> list[Path]:
    """The uploaded files, each an image the CLI can decode or a small .txt caption; one line for the first
    that is not."""
    from ..data.images import load_image

    if len(files) > max_files:
        raise ConceptorError(f"{len(files)} files uploaded; the page takes at most {max_files} per run")
    root = upload_root()
    paths = []
    for f in files:
        p = Path(f).resolve()
        if root not in p.parents or not p.is_file():
            raise ConceptorError(f"{Path(f).name} is not an upload of this page; upload it again")
        ext = p.suffix.lower()
        if ext not in IMAGE_EXTS | CAPTION_EXTS:
            raise ConceptorError(f"{p.name}: only images ({', '.join(sorted(IMAGE_EXTS))}) and .txt captions "
                                 "can be uploaded")
        size = p.stat().st_size
        if size > (MAX_CAPTION_BYTES if ext in CAPTION_EXTS else max_mb * 1e6):
            limit = f"{MAX_CAPTION_BYTES // 1000} kB" if ext in CAPTION_EXTS else f"{max_mb:g} MB"
            raise ConceptorError(f"{p.name} is {size / 1e6:.1f} MB; uploads are limited to {limit} each")
        if ext in IMAGE_EXTS:
            load_image(p)  # the CLI's checks; raises one line naming the file
        else:
            try:
                p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ConceptorError(f"{p.name} is not UTF-8 text; save the caption as plain text") from None
        paths.append(p)
    if files and not any(p.suffix.lower() in IMAGE_EXTS for p in paths):
        raise ConceptorError("the upload holds no images; add the pictures of your concept")
    return paths


def copy_uploads(paths: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for p in paths:
        name = _safe_name(p.name)
        if name.lower() in taken:
            raise ConceptorError(f"two uploads are named {name}; rename one")
        taken.add(name.lower())
        shutil.copyfile(p, dest / name)


def _safe_name(name: str) -> str:
    """A plain file name: Gradio keeps the browser's name, which may hold anything."""
    stem, ext = Path(name).stem, Path(name).suffix.lower()
    stem = re.sub(r"[^\w.-]+", "_", stem).strip("._") or "image"
    return stem[:100] + ext


def form_config(form: TrainForm, folders: Folders, images: Path | None) -> dict:
    """The run config (config-file layout) for ``form``; ``images`` is the uploads' folder, if any."""
    models = list_models(folders)
    if form.model not in models:
        raise ConceptorError(f"model {form.model!r} is not in the list; press refresh and pick one")
    source = images
    if source is None:
        if not form.folder.strip():
            raise ConceptorError("upload images or type a folder (relative to the data folder) to train on")
        source = inside(form.folder, folders.data, "image folder" if form.method != "finetune" else "dataset")
    steps = int(form.steps)
    if steps < 1:
        raise ConceptorError(f"steps must be at least 1, got {steps}")
    bundled = form.model == BUNDLED
    train = {"steps": steps, "seed": int(form.seed), "mixed_precision": form.mixed_precision,
             # Often enough that a restarted page loses little, a curve has points and the page sees grids.
             "checkpoint_every": int(form.checkpoint_every or max(1, min(500, steps // 5))),
             "log_every": max(1, steps // 100),
             "validation_every": int(form.validation_every or max(1, steps // 4))}
    if form.batch_size:
        train["batch_size"] = int(form.batch_size)
    optim = {"lr": float(form.lr)} if form.lr else {}
    data = {"resolution": int(form.resolution)} if form.resolution else {}
    config: dict = {"model": {"model": models[form.model]}, "data": data, "optim": optim, "train": train}
    validation = form.validation_prompt.strip()
    if form.method == "textual-inversion":
        config["textual_inversion"] = {"token": form.token.strip(), "init_token": form.init_word.strip(),
                                       "vectors": int(form.vectors)}
        data["images"] = str(source)
        validation = validation or f"a photo of a {form.token.strip()}"
        if bundled:
            _toy_defaults(config)
    elif form.method == "dreambooth":
        config["dreambooth"] = {"instance_prompt": form.instance_prompt.strip(),
                                "class_prompt": form.class_prompt.strip() or None}
        data["images"] = str(source)
        validation = validation or form.instance_prompt.strip()
    elif form.method == "pivotal":  # the token fields and the DreamBooth prompts together
        config["pivotal"] = {"token": form.token.strip(), "init_token": form.init_word.strip(),
                             "vectors": int(form.vectors),
                             "instance_prompt": form.instance_prompt.strip() or None,
                             "class_prompt": form.class_prompt.strip() or None}
        data["images"] = str(source)
        validation = validation or f"a photo of {form.token.strip()}"
    elif form.method == "finetune":
        config["finetune"] = {"dataset": str(source)}
    else:
        config[form.method.replace("-", "_")] = {}
        data["images"] = str(source)
    if form.method in ("dreambooth", "finetune"):
        config["lora"] = {"enabled": bool(form.lora), "rank": int(form.rank), "adapter": form.adapter}
    elif form.method == "pivotal":  # always an adapter
        config["lora"] = {"rank": int(form.rank), "adapter": form.adapter}
    if validation:
        train["validation_prompts"] = [validation]
    return config


def _toy_defaults(config: dict) -> None:
    """Textual inversion on the bundled toy model: the demo's measured settings (conceptor/demo.py) where the
    form leaves them open: prompts in the toy vocabulary, batch 8, lr 5e-3 with a cosine decay, min-SNR 5."""
    from ..toyworld.concept import TEMPLATES

    config["textual_inversion"].setdefault("templates", str(TEMPLATES))
    config["train"].setdefault("batch_size", 8)
    config["train"].setdefault("snr_gamma", 5.0)
    config["optim"].setdefault("lr", 5e-3)
    config["optim"].setdefault("lr_scheduler", "cosine")

"""Image folders: listing, decoding with clear errors, and the seeds' resize/crop preprocessing."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ConceptorError

log = logging.getLogger("conceptor")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTS = {".txt", ".caption"}


def list_images(folder: str | Path) -> list[Path]:
    """Image files in ``folder`` (sorted, not recursive). Other files are skipped with one warning."""
    folder = Path(folder)
    if not folder.exists():
        raise ConceptorError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise ConceptorError(f"{folder} is not a folder; pass the folder that holds your images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
    skipped = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTS | CAPTION_EXTS]
    if skipped:
        log.warning("skipping %d non-image file(s) in %s: %s", len(skipped), folder, ", ".join(skipped[:5]))
    if not images:
        raise ConceptorError(f"no images in {folder}; put 3-20 .png/.jpg pictures of your concept there")
    return images


def load_image(path: Path, background=(255, 255, 255)) -> Image.Image:
    """Decode fully (so truncation shows here, naming the file) and return 8-bit RGB.

    EXIF orientation is honoured; transparency is composited on ``background`` (white); 16-bit images
    are scaled, not clipped; an animated file gives its first frame (warned); images larger than PIL's
    decompression-bomb limit are refused; very small ones are accepted and warned about.
    """
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                log.warning("%s has %d frames; using the first", path, im.n_frames)
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit greyscale: PIL's convert() clips at 255, so scale to 8 bits first.
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                im = Image.fromarray((arr * (255.0 / top)).round().clip(0, 255).astype(np.uint8), "L")
            if im.mode in ("RGBA", "LA", "PA", "P") and ("A" in im.mode or "transparency" in im.info):
                rgba = im.convert("RGBA")
                flat = Image.new("RGB", rgba.size, background)
                flat.paste(rgba, mask=rgba.getchannel("A"))
                im = flat
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ConceptorError(f"cannot read image {path}: {str(e) or type(e).__name__}; fix or remove it") from None
    if min(im.size) < 32:
        log.warning("%s is only %dx%d pixels; it will be upscaled, expect blur", path, *im.size)
    return im


def to_tensor(image: Image.Image, resolution: int, center_crop: bool) -> torch.Tensor:
    """The seeds' preprocessing: optional centre square crop, bicubic resize to a square, [-1, 1] CHW."""
    if center_crop:
        w, h = image.size
        s = min(w, h)
        image = image.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
    return pil_to_tensor(image.resize((resolution, resolution), resample=Image.BICUBIC))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [-1, 1] float CHW, the range SD's VAE was trained on."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def read_caption(image_path: Path) -> str | None:
    """The sidecar caption ``img.txt`` (or ``img.caption``) beside ``img.png``, if any."""
    for ext in CAPTION_EXTS:
        p = image_path.with_suffix(ext)
        if p.is_file():
            try:
                text = p.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise ConceptorError(f"caption {p} is not UTF-8 text; re-save it as UTF-8") from None
            return text or None
    return None

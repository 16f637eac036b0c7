"""Image-caption datasets from the layouts people already have, every row checked before training starts.

Sources (``--dataset SRC``):
- a CSV with ``image_path,caption`` columns (the seeds' Pokemon-BLIP layout); relative paths resolve
  against the CSV's folder;
- a folder with ``metadata.jsonl`` (``file_name``, ``text``: Hugging Face's imagefolder convention);
- a folder of images with sidecar ``.txt`` captions;
- a folder written by ``datasets.Dataset.save_to_disk``, or (with network) a hub dataset name.
Column names can be overridden (``--image-column``, ``--caption-column``).
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import ConceptorError
from .images import IMAGE_EXTS, load_image, read_caption

log = logging.getLogger("conceptor")


@dataclass
class Example:
    caption: str
    path: Path | None = None  # a file on disk, or
    data: bytes | None = None  # the encoded image itself (datasets rows)
    where: str = ""  # "row 12 of x.csv" / the file name: what a user looks for when a row is bad
    size: tuple[int, int] | None = None  # (width, height), recorded when the row is checked

    def image(self) -> Image.Image:
        if self.path is not None:
            return load_image(self.path)
        try:
            with Image.open(io.BytesIO(self.data)) as im:
                return im.convert("RGB")
        except Exception as e:
            raise ConceptorError(f"cannot decode the image of {self.where}: {e}") from None

    def image_bytes(self) -> bytes:
        """The encoded image: what the latent cache is keyed by (a changed file is never served stale)."""
        return self.path.read_bytes() if self.path is not None else self.data


def load_examples(source: str, image_column: str | None = None, caption_column: str | None = None,
                  skip_bad: bool = False) -> list[Example]:
    """Every (image, caption) of ``source``, checked: missing files, empty captions, undecodable images."""
    p = Path(source).expanduser()
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv"):
        rows = _from_csv(p, image_column or "image_path", caption_column or "caption")
    elif p.is_dir() and (p / "metadata.jsonl").is_file():
        rows = _from_jsonl(p / "metadata.jsonl", image_column or "file_name", caption_column or "text")
    elif p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        rows = _from_datasets(str(p), image_column, caption_column, on_disk=True)
    elif p.is_dir():
        rows = _from_sidecars(p)
    elif p.exists():
        raise ConceptorError(f"--dataset {source}: not a .csv file or a folder")
    elif "/" in source and not source.startswith((".", "/", "~")):
        rows = _from_datasets(source, image_column, caption_column, on_disk=False)
    else:
        raise ConceptorError(f"--dataset {source} does not exist")
    return _check(rows, source, skip_bad)


def _check(rows: list[Example], source: str, skip_bad: bool) -> list[Example]:
    good, bad = [], []
    for ex in rows:
        problem = None
        if not ex.caption.strip():
            problem = "empty caption"
        elif ex.path is not None and not ex.path.is_file():
            problem = f"image {ex.path} does not exist"
        else:
            try:
                ex.size = ex.image().size
            except ConceptorError as e:
                problem = str(e)
        (bad if problem else good).append((ex, problem))
    if bad:
        first = ", ".join(f"{ex.where}: {why}" for ex, why in bad[:3])
        if not skip_bad:
            raise ConceptorError(f"{len(bad)} bad example(s) in {source} ({first}); fix them or pass --skip-bad")
        log.warning("skipping %d bad example(s) of %d in %s (%s)", len(bad), len(rows), source, first)
    if not good:
        raise ConceptorError(f"no usable examples in {source}")
    return [ex for ex, _ in good]


def _from_csv(path: Path, image_col: str, caption_col: str) -> list[Example]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            fields = reader.fieldnames or []
            missing = [c for c in (image_col, caption_col) if c not in fields]
            if missing:
                raise ConceptorError(f"{path.name} has no column(s) {', '.join(missing)} (columns: "
                                     f"{', '.join(fields)}); pass --image-column/--caption-column")
            return [Example(caption=(r[caption_col] or "").strip(), path=(path.parent / (r[image_col] or "")),
                            where=f"row {i + 2} of {path.name}") for i, r in enumerate(reader)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConceptorError(f"cannot read {path} as CSV: {e}") from None


def _from_jsonl(path: Path, image_col: str, caption_col: str) -> list[Example]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise ConceptorError(f"line {i + 1} of {path} is not JSON") from None
        if image_col not in r:
            raise ConceptorError(f"line {i + 1} of {path} has no {image_col!r}; pass --image-column")
        rows.append(Example(caption=str(r.get(caption_col, "")).strip(), path=path.parent / r[image_col],
                            where=f"line {i + 1} of {path.name}"))
    return rows


def _from_sidecars(folder: Path) -> list[Example]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not images:
        raise ConceptorError(f"{folder} holds no images, metadata.jsonl or saved dataset")
    return [Example(caption=read_caption(p) or "", path=p, where=p.name) for p in images]


def _from_datasets(source: str, image_col: str | None, caption_col: str | None, on_disk: bool) -> list[Example]:
    try:
        import datasets
    except ImportError:
        raise ConceptorError("reading a Hugging Face dataset needs the datasets package: "
                             "pip install 'conceptor[datasets]'") from None
    try:
        ds = datasets.load_from_disk(source) if on_disk else datasets.load_dataset(source)
    except Exception as e:  # network, missing files, wrong layout: one line says which
        raise ConceptorError(f"cannot load dataset {source}: {str(e).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    cols = ds.column_names
    image_col = image_col or next((c for c in ("image", "img", "file_name") if c in cols), None)
    caption_col = caption_col or next((c for c in ("text", "caption", "prompt") if c in cols), None)
    if image_col not in cols or caption_col not in cols:
        raise ConceptorError(f"dataset {source} has columns {', '.join(cols)}; pass --image-column and "
                             "--caption-column")
    ds = ds.cast_column(image_col, datasets.Image(decode=False)) if isinstance(
        ds.features[image_col], datasets.Image) else ds
    rows = []
    for i, r in enumerate(ds):
        img = r[image_col]
        data = img.get("bytes") if isinstance(img, dict) else None
        path = Path(img["path"]) if isinstance(img, dict) and not data and img.get("path") else None
        if isinstance(img, str):
            path = Path(img)
        rows.append(Example(caption=str(r[caption_col] or "").strip(), path=path, data=data, where=f"row {i}"))
    return rows

"""One dataset description for every method: subsets of images with captions, masks, repeats, roles and sizes.

A run's data is a list of subsets: those of a kohya dataset-config TOML (data/dataset_config.py), or the one
subset that ``--images DIR`` or ``--dataset SRC`` describe (the shorthands). ``load_training_set`` flattens them
into items, one per image, each knowing its subset, its own caption (a sidecar file or a metadata row; None when
the subset's ``class_tokens`` or the method's templates caption it), its mask and the size it trains at (the
dataset's resolution, or its aspect-ratio bucket). Methods read pixels, masks and captions from here and draw
batches from data/order.py, so every method gets subsets, repeats, buckets and masks the same way.
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConceptorError
from .buckets import fit, make_buckets, nearest_bucket
from .captions import Example, load_examples
from .dataset_config import SUBSET_OPTIONS, Dataset, Subset, read_dataset_config
from .images import IMAGE_EXTS, list_images, pil_to_tensor

log = logging.getLogger("conceptor")
MASK_SUFFIX = "_mask"  # NAME_mask.png beside NAME.png: white = the concept, black = the rest


@dataclass
class Item:
    example: Example  # the image: a file or encoded bytes, where it came from, its size
    subset: int  # index into TrainingSet.subsets
    caption: str | None  # its own caption (sidecar file, metadata row); None: the subset's class_tokens/templates
    mask: Path | None = None  # its NAME_mask.png (alpha masks come from the image itself)
    size: tuple[int, int] | None = None  # (width, height) it trains at: set by TrainingSet.assign_sizes
    caption_from: str = ""  # where its caption was read (a caption file's path, a row): what messages name


@dataclass
class TrainingSet:
    datasets: list[Dataset]
    subsets: list[Subset]
    dataset_of: list[int]  # subset index -> dataset index
    items: list[Item]
    squash: bool = False  # the shorthands' square resize (the seeds'); a dataset config keeps aspect and crops
    center_crop: bool = False  # with squash: crop the centre square first (--center-crop)
    source: str = ""  # what messages name: the TOML file, or the shorthand's flag
    resolutions: dict[int, tuple[int, int]] = field(default_factory=dict)  # dataset -> its training size
    held_out: set[int] = field(default_factory=set)  # items kept out of training for the validation loss

    def subset_of(self, i: int) -> Subset:
        return self.subsets[self.items[i].subset]

    def indices(self, reg: bool) -> list[int]:
        return [i for i, it in enumerate(self.items) if self.subsets[it.subset].is_reg == reg]

    def hold_out(self, split: float | None, seed: int) -> None:
        """Keep ``split`` (or each dataset's validation_split) of every concept subset's images out of training,
        chosen by ``seed``; at least one stays in training. The validation loss is measured on them."""
        rng = random.Random(seed)
        for k, sub in enumerate(self.subsets):
            share = split if split is not None else self.datasets[self.dataset_of[k]].validation_split
            members = [i for i, it in enumerate(self.items) if it.subset == k]
            if sub.is_reg or not share or len(members) < 2:
                continue
            n = min(len(members) - 1, max(1, round(share * len(members))))
            self.held_out.update(rng.sample(members, n))

    def validation_items(self) -> list[int]:
        """What the validation loss measures: the held-out images, else the concept images themselves."""
        return sorted(self.held_out) or self.indices(False)

    def entries(self, reg: bool = False) -> list[int]:
        """One epoch's item indices: each item ``num_repeats`` times (kohya's repeats), repeat by repeat, so one
        subset with r repeats lists items 0..n-1 r times as data/order.batch_indices counts them."""
        out = []
        top = max((s.num_repeats for s in self.subsets), default=1)
        for r in range(top):
            out += [i for i in self.indices(reg) if self.subset_of(i).num_repeats > r and i not in self.held_out]
        return out

    @property
    def has_masks(self) -> bool:
        return any(s.masks or s.alpha_mask for s in self.subsets)

    def file_batch_size(self) -> int | None:
        """The batch size the dataset config asks for (kohya's per-dataset ``batch_size``), if it sets one."""
        sizes = {d.batch_size for d in self.datasets if d.batch_size_given}
        if len(sizes) > 1:
            raise ConceptorError(f"{self.source}: datasets ask for batch sizes {sorted(sizes)}; conceptor trains one "
                                 "batch size per run: give every dataset the same batch_size")
        return sizes.pop() if sizes else None

    # -- sizes -------------------------------------------------------------------------------------
    def assign_sizes(self, default_resolution: int, min_step: int, buckets: bool = False,
                     min_res: int | None = None, max_res: int | None = None) -> None:
        """Each item's training size: its dataset's resolution (the model's by default), or with buckets the
        bucket nearest its aspect ratio at about that area. ``min_step``: the latent grid in pixels (8 on SD
        1/2/XL, 16 on Flux, which packs 2x2 latents); bucket sides are multiples of it."""
        for d, ds in enumerate(self.datasets):
            w, h = ds.resolution or (default_resolution, default_resolution)
            bucketed = ds.enable_bucket or buckets
            if ds.config_given:
                step = ds.bucket_reso_steps
                lo, hi = ds.min_bucket_reso, ds.max_bucket_reso
            else:  # the shorthands' --buckets: as finetune always bucketed
                step = 64 if min(w, h) >= 256 else min_step
                lo, hi = min_res or min(w, h) // 2, max_res or max(w, h) * 2
            for side, what in ((w, "resolution"), (h, "resolution")) + (((step, "bucket_reso_steps"),) if bucketed
                                                                          else ()):
                if side % min_step:
                    raise ConceptorError(f"{self.source}: {ds.where}: {what} {side} must be a multiple of {min_step} "
                                         "(the model's latent grid)")
            self.resolutions[d] = (w, h)
            members = [it for it in self.items if self.dataset_of[it.subset] == d]
            if bucketed:
                area_side = int(math.sqrt(w * h)) // step * step or step
                grid = make_buckets(area_side, lo, hi, step)
                for it in members:
                    it.size = nearest_bucket(it.example.size, grid)
            else:
                for it in members:
                    it.size = (w, h)

    # -- pixels and masks ---------------------------------------------------------------------------
    def _shape(self, im: Image.Image, size: tuple[int, int], resample) -> Image.Image:
        """The one geometric transform of an item, applied alike to its image and its mask."""
        if self.squash and size[0] == size[1]:
            if self.center_crop:
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
            return im.resize(size, resample=resample)
        return fit(im, size, "center", resample=resample)[0]

    def pixels(self, i: int) -> torch.Tensor:
        """Item ``i`` as [-1, 1] CHW at its training size."""
        it = self.items[i]
        return pil_to_tensor(self._shape(it.example.image(), it.size, Image.BICUBIC))

    def raw_mask(self, i: int) -> Image.Image | None:
        """Item ``i``'s mask as drawn (its NAME_mask.png, or its alpha channel), 8-bit, or None."""
        it = self.items[i]
        if it.mask is not None:
            return read_mask(it.mask, it.example.size, it.example.where)
        return read_alpha(it.example) if self.subset_of(i).alpha_mask else None

    def mask(self, i: int) -> torch.Tensor | None:
        """Item ``i``'s mask at its training size, [1, h, w] in [0, 1] (1 = the concept), or None."""
        m = self.raw_mask(i)
        if m is None:
            return None
        m = self._shape(m, self.items[i].size, Image.BILINEAR)
        return torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None]


def read_mask(path: Path, image_size: tuple[int, int] | None, image: str) -> Image.Image:
    """A mask file as 8-bit greyscale; it must be the size of its image."""
    try:
        with Image.open(path) as im:
            im.load()
            # A mask drawn as transparency over one flat colour is its alpha channel; otherwise its brightness.
            flat = "A" in im.getbands() and len(set(im.convert("L").getextrema())) == 1
            mask = im.getchannel("A") if flat else im.convert("L")
    except (OSError, ValueError, SyntaxError) as e:
        raise ConceptorError(f"cannot read mask {path}: {str(e) or type(e).__name__}; fix or remove it") from None
    if image_size is not None and mask.size != tuple(image_size):
        raise ConceptorError(f"mask {path.name} is {mask.size[0]}x{mask.size[1]} but its image {image} is "
                             f"{image_size[0]}x{image_size[1]}; a mask must be the size of its image")
    return mask


def read_alpha(example: Example) -> Image.Image | None:
    """The alpha channel of an image (kohya's ``alpha_mask``), or None when it has none."""
    if example.path is None:
        return None
    with Image.open(example.path) as im:
        if "A" not in im.getbands() and "transparency" not in im.info:
            return None
        return im.convert("RGBA").getchannel("A")


# -- reading subsets -----------------------------------------------------------------------------------

def _mask_file(image: Path, sub: Subset) -> Path | None:
    folder = sub.mask_dir or image.parent
    for ext in (".png", ".webp", ".jpg", ".jpeg", ".bmp"):
        p = folder / f"{image.stem}{MASK_SUFFIX}{ext}"
        if p.is_file():
            return p
    return None


def _sidecar(image: Path, extension: str | None) -> tuple[str | None, Path | None]:
    """kohya: the caption file NAME + caption_extension; the shorthand reads .txt or .caption ("auto")."""
    if extension is None:
        return None, None
    exts = (".txt", ".caption") if extension == "auto" else (extension,)
    for ext in exts:
        p = image.with_name(image.stem + ext) if ext.startswith(".") else image.with_suffix("." + ext)
        if p.is_file():
            try:
                return p.read_text(encoding="utf-8").strip() or None, p
            except UnicodeDecodeError:
                raise ConceptorError(f"caption {p} is not UTF-8 text; re-save it as UTF-8") from None
    return None, None


def concept_images(folder: str | Path) -> list[Path]:
    """The training images of a folder: its images without the NAME_mask.png masks beside them."""
    return _folder_images(Path(folder), "")


def _folder_images(folder: Path, where: str) -> list[Path]:
    """Images of a subset folder, without the masks that sit beside them."""
    try:
        images = list_images(folder)
    except ConceptorError as e:
        raise ConceptorError(f"{where}: {e}" if where else str(e)) from None
    stems = {p.stem for p in images}
    return [p for p in images if not (p.stem.endswith(MASK_SUFFIX) and p.stem[:-len(MASK_SUFFIX)] in stems)]


def _kohya_metadata(sub: Subset, where: str) -> list[tuple[Path, str]]:
    """kohya's fine-tuning metadata JSON: {image key: {"caption": ..., "tags": ...}}; keys are paths, or names
    under image_dir with or without their extension."""
    try:
        data = json.loads(Path(sub.metadata_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConceptorError(f"{where}: cannot read metadata_file {sub.metadata_file}: {e}") from None
    if not isinstance(data, dict):
        raise ConceptorError(f"{where}: metadata_file {sub.metadata_file} must map image keys to captions")
    out = []
    for image_key, md in data.items():
        md = md if isinstance(md, dict) else {}
        caption, tags = md.get("caption"), md.get("tags")
        caption = tags if caption is None else (f"{caption}, {tags}" if tags else caption)
        path = Path(image_key)
        candidates = [path] if path.is_absolute() else []
        base = sub.image_dir or Path(sub.metadata_file).parent
        candidates += [base / image_key] + [base / (image_key + ext) for ext in sorted(IMAGE_EXTS)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConceptorError(f"{where}: metadata_file names {image_key!r} but no such image is in {base}")
        out.append((found, (caption or "").strip()))
    return out


def _subset_items(sub: Subset, k: int, where: str, skip_bad: bool) -> list[Item]:
    if sub.source is not None:  # conceptor's: CSV / metadata.jsonl folder / .txt folder / datasets
        try:
            examples = load_examples(sub.source, sub.image_column, sub.caption_column, skip_bad)
        except ConceptorError as e:
            raise ConceptorError(f"{where}: {e}") from None
        items = [Item(ex, k, ex.caption or None, caption_from=ex.where) for ex in examples]
    else:
        if sub.metadata_file is not None:
            pairs = [(p, c, f"{Path(sub.metadata_file).name} ({p.name})") for p, c in _kohya_metadata(sub, where)]
        else:
            pairs = [(p, *_sidecar(p, sub.caption_extension)) for p in _folder_images(sub.image_dir, where)]
        items = []
        for path, caption, caption_from in pairs:
            ex = Example(caption=caption or "", path=path, where=path.name)
            try:
                ex.size = ex.image().size
            except ConceptorError as e:
                if not skip_bad:
                    raise ConceptorError(f"{where}: {e}") from None
                log.warning("skipping %s: %s", path, e)
                continue
            items.append(Item(ex, k, caption, caption_from=str(caption_from or "")))
    if not items:
        raise ConceptorError(f"{where} has no usable images; check its folder or source")
    if sub.masks:
        for it in items:
            it.mask = _mask_file(it.example.path, sub) if it.example.path is not None else None
            if it.mask is not None:  # its size now (the header alone), not minutes later while caching latents
                try:
                    with Image.open(it.mask) as m:
                        size = m.size
                except (OSError, ValueError, SyntaxError) as e:
                    raise ConceptorError(f"{where}: cannot read mask {it.mask.name}: {e}") from None
                if size != tuple(it.example.size):
                    raise ConceptorError(f"{where}: mask {it.mask.name} is {size[0]}x{size[1]} but its image "
                                         f"{it.example.where} is {it.example.size[0]}x{it.example.size[1]}; a mask "
                                         "must be the size of its image")
    return items


def load_training_set(datasets: list[Dataset], source: str, *, skip_bad: bool = False, squash: bool = False,
                      center_crop: bool = False) -> TrainingSet:
    """Every subset's items, read and checked (images decode, captions read, masks found)."""
    subsets, dataset_of, items = [], [], []
    for d, ds in enumerate(datasets):
        for sub in ds.subsets:
            k = len(subsets)
            subsets.append(sub)
            dataset_of.append(d)
            where = f"{source}: {sub.name}" if source.endswith(".toml") else f"{source} {sub.name}".strip()
            items += _subset_items(sub, k, where if source.endswith(".toml") else source, skip_bad)
    return TrainingSet(datasets, subsets, dataset_of, items, squash=squash, center_crop=center_crop, source=source)


def read_training_set(path: str | Path, skip_bad: bool = False) -> TrainingSet:
    """A kohya dataset-config TOML, read and loaded."""
    return load_training_set(read_dataset_config(path), Path(path).name, skip_bad=skip_bad)


def shorthand(where: str, *, image_dir: str | None = None, source: str | None = None, class_tokens: str | None = None,
              num_repeats: int = 1, caption_extension: str | None = "auto", flip: bool = False,
              masks: bool = False, resolution: int | None = None, image_column: str | None = None,
              caption_column: str | None = None, caption_dropout: float = 0.0, token: str | None = None,
              is_reg: bool = False) -> Dataset:
    """The one dataset with one subset that the flags describe (``--images DIR`` or ``--dataset SRC``)."""
    values = {k: default for k, (default, _) in SUBSET_OPTIONS.items()}
    values.update(image_dir=Path(image_dir) if image_dir else None, source=source, class_tokens=class_tokens,
                  num_repeats=num_repeats, caption_extension=caption_extension, flip_aug=flip, masks=masks,
                  image_column=image_column, caption_column=caption_column, caption_dropout_rate=caption_dropout,
                  token=token, is_reg=is_reg)
    sub = Subset(where=where, **values)
    return Dataset(where=where, resolution=(resolution, resolution) if resolution else None, batch_size=1,
                   enable_bucket=False, min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64,
                   subsets=[sub], config_given=False)


def with_subset(ds: Dataset, sub: Subset) -> Dataset:
    return replace(ds, subsets=[*ds.subsets, sub])


# -- captions ------------------------------------------------------------------------------------------

def tags(caption: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in caption.strip().split(separator)]


def realise(caption: str, sub: Subset, rng: random.Random, dropped: bool | None = None) -> str:
    """One training-time caption, as kohya's process_caption makes it: prefix and suffix, caption dropout,
    then (when asked) the tags after the first ``keep_tokens`` shuffled and each dropped with
    ``caption_tag_dropout_rate``; tags are rejoined with ", ". ``dropped`` (decided by the caller) overrides the
    subset's caption dropout draw."""
    if sub.caption_prefix:
        caption = f"{sub.caption_prefix} {caption}"
    if sub.caption_suffix:
        caption = f"{caption} {sub.caption_suffix}"
    if dropped is None:
        dropped = sub.caption_dropout_rate > 0 and rng.random() < sub.caption_dropout_rate
    if dropped:
        return ""
    if not (sub.shuffle_caption or sub.caption_tag_dropout_rate > 0):
        return caption
    parts = tags(caption, sub.caption_separator)
    fixed, flex = parts[:sub.keep_tokens], parts[sub.keep_tokens:]
    if sub.shuffle_caption:
        rng.shuffle(flex)
    if sub.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= sub.caption_tag_dropout_rate]
    return ", ".join(fixed + flex)


def caption_rng(seed: int, micro_index: int, row: int) -> random.Random:
    """The randomness of one row's caption, from (seed, micro-batch, row) alone: resuming redraws it exactly,
    and it takes nothing from the step's torch generator (noise and timesteps stay as they were)."""
    return random.Random((seed * 1_000_003 + micro_index) * 65_537 + row)

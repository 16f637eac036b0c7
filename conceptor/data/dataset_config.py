"""kohya sd-scripts' dataset config, read into typed datasets and subsets (issue 21, first piece: the reader).

The file is TOML: ``[general]``, then ``[[datasets]]``, each with ``[[datasets.subsets]]``. A value set in
``[general]`` or a dataset applies to the subsets below it unless they set their own (kohya's "ascendable"
options). A kohya user's file reads unchanged; an option kohya has that conceptor does not implement is refused
by name, never ignored, and so is a name neither knows (a typo would otherwise do nothing). conceptor adds keys
only where kohya has none: ``token``/``init_token`` (the new token of a textual-inversion subset and the word(s)
it starts from: several start from their mean), ``masks``/``mask_dir`` (a ``NAME_mask.png`` sidecar per image:
white is the concept, black the rest), ``source`` with ``image_column``/``caption_column`` (a CSV, a folder with
metadata.jsonl or a saved ``datasets`` folder, as ``conceptor train finetune --dataset`` reads them).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConceptorError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib

# Subset options conceptor implements, with their kohya defaults and types.
SUBSET_OPTIONS: dict[str, tuple[Any, type | tuple]] = {
    "image_dir": (None, str), "metadata_file": (None, str), "class_tokens": (None, str), "num_repeats": (1, int),
    "is_reg": (False, bool), "caption_extension": (".caption", str), "shuffle_caption": (False, bool),
    "keep_tokens": (0, int), "caption_separator": (",", str), "caption_prefix": (None, str),
    "caption_suffix": (None, str), "caption_dropout_rate": (0.0, (int, float)),
    "caption_tag_dropout_rate": (0.0, (int, float)), "flip_aug": (False, bool), "alpha_mask": (False, bool),
    # conceptor's own keys (kohya has none for these):
    "token": (None, str), "init_token": (None, str),  # the new token of a textual-inversion subset, its start word(s)
    "masks": (False, bool), "mask_dir": (None, str),  # NAME_mask.png beside each image (or in mask_dir)
    "source": (None, str), "image_column": (None, str), "caption_column": (None, str),  # data/captions.py sources
}
# Dataset options (they apply to every subset of the dataset).
DATASET_OPTIONS: dict[str, tuple[Any, type | tuple]] = {
    "validation_split": (0.0, (int, float)),  # kohya's: the share of images held out for the validation loss
    "resolution": (None, (int, list)), "batch_size": (1, int), "enable_bucket": (False, bool),
    "min_bucket_reso": (256, int), "max_bucket_reso": (1024, int), "bucket_reso_steps": (64, int),
}
# kohya options conceptor does not implement (yet): refused by name so that none is silently ignored.
KOHYA_UNSUPPORTED = frozenset({
    "color_aug", "face_crop_aug_range", "random_crop", "sample_ratio", "keep_tokens_separator",
    "secondary_separator", "enable_wildcard", "token_warmup_min", "token_warmup_step", "custom_attributes",
    "resize_interpolation", "caption_dropout_every_n_epochs", "cache_info", "conditioning_data_dir",
    "bucket_no_upscale", "network_multiplier", "validation_seed", "repeat_by_folder_name",
    "path_pattern", "prior_loss_weight", "debug_dataset",
})


@dataclass(frozen=True)
class Subset:
    where: str  # "datasets[0].subsets[1]", for messages
    image_dir: Path | None
    metadata_file: Path | None
    class_tokens: str | None
    num_repeats: int
    is_reg: bool
    caption_extension: str
    shuffle_caption: bool
    keep_tokens: int
    caption_separator: str
    caption_prefix: str | None
    caption_suffix: str | None
    caption_dropout_rate: float
    caption_tag_dropout_rate: float
    flip_aug: bool
    alpha_mask: bool
    token: str | None = None
    init_token: str | None = None
    masks: bool = False
    mask_dir: Path | None = None
    source: str | None = None
    image_column: str | None = None
    caption_column: str | None = None

    @property
    def name(self) -> str:
        """What messages call the subset: its folder or source and its place in the file."""
        what = self.image_dir or self.source or self.metadata_file
        return f"{self.where} ({what})" if what else self.where


@dataclass(frozen=True)
class Dataset:
    where: str
    resolution: tuple[int, int] | None  # (width, height); None: the model's
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    subsets: list[Subset] = field(default_factory=list)
    validation_split: float = 0.0  # share of each concept subset's images held out for the validation loss
    config_given: bool = True  # False: the one dataset the flags describe (bucket sizes follow --resolution)
    batch_size_given: bool = False  # the file sets batch_size (it then sets the run's --batch-size)


def _check_keys(table: dict, allowed: set[str], file: str, where: str) -> None:
    for name in table:
        if name in KOHYA_UNSUPPORTED:
            raise ConceptorError(f"{file}: {where}: kohya option {name!r} is not supported by conceptor; remove it "
                                 "(it would otherwise be ignored)")
        if name not in allowed:
            raise ConceptorError(f"{file}: {where}: unknown option {name!r}; see kohya's dataset config "
                                 "(image_dir, num_repeats, class_tokens, is_reg, caption_extension, ...)")


def _value(name: str, tables: list[dict], options: dict, file: str, where: str):
    """The nearest table's value of ``name`` (subset, then dataset, then general), type-checked."""
    default, kind = options[name]
    for table in tables:
        if name in table:
            value = table[name]
            if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else ()):
                raise ConceptorError(f"{file}: {where}: {name} is {value!r}; expected a number or text, not true/false")
            if not isinstance(value, kind):
                want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                raise ConceptorError(f"{file}: {where}: {name} is {value!r}; expected {want}")
            return value
    return default


def _path(value: str | None, base: Path, file: str, where: str, name: str) -> Path | None:
    """kohya resolves paths from the working directory; a path that is not there is tried beside the file."""
    if value is None:
        return None
    for candidate in (Path(value).expanduser(), base / value):
        if candidate.exists():
            return candidate
    raise ConceptorError(f"{file}: {where}: {name} {value} does not exist (relative paths are read from the "
                         f"current folder or the file's)")


def read_dataset_config(path: str | Path) -> list[Dataset]:
    """The datasets and subsets of a kohya dataset-config TOML, every value resolved; one line per problem."""
    p = Path(path)
    file = p.name
    if not p.is_file():
        raise ConceptorError(f"dataset config {path} does not exist")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConceptorError(f"{file} is not valid TOML: {str(e).splitlines()[0]}") from None
    _check_keys(doc, {"general", "datasets"}, file, "top level")
    general = doc.get("general", {})
    _check_keys(general, set(SUBSET_OPTIONS) | set(DATASET_OPTIONS), file, "[general]")
    datasets = doc.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise ConceptorError(f"{file}: no [[datasets]]; a dataset config lists at least one, each with "
                             "[[datasets.subsets]]")
    out, roles = [], {}
    for i, ds in enumerate(datasets):
        where = f"datasets[{i}]"
        _check_keys(ds, set(SUBSET_OPTIONS) | set(DATASET_OPTIONS) | {"subsets"}, file, where)
        res = _value("resolution", [ds, general], DATASET_OPTIONS, file, where)
        if isinstance(res, list) and (len(res) != 2 or not all(isinstance(r, int) for r in res)):
            raise ConceptorError(f"{file}: {where}: resolution {res!r}; give one size or [width, height]")
        size = None if res is None else ((res, res) if isinstance(res, int) else (res[0], res[1]))
        if size is not None and min(size) <= 0:
            raise ConceptorError(f"{file}: {where}: resolution {res!r} must be positive")
        settings = {k: _value(k, [ds, general], DATASET_OPTIONS, file, where) for k in DATASET_OPTIONS
                    if k != "resolution"}
        if not 0 <= settings["validation_split"] < 1:
            raise ConceptorError(f"{file}: {where}: validation_split is {settings['validation_split']}; it must be "
                                 "in [0, 1), e.g. 0.1")
        if settings["batch_size"] < 1:
            raise ConceptorError(f"{file}: {where}: batch_size must be at least 1")
        subsets = []
        for j, sub in enumerate(ds.get("subsets", [])):
            sw = f"{where}.subsets[{j}]"
            _check_keys(sub, set(SUBSET_OPTIONS), file, sw)
            v = {k: _value(k, [sub, ds, general], SUBSET_OPTIONS, file, sw) for k in SUBSET_OPTIONS}
            if sum(v[k] is not None for k in ("image_dir", "metadata_file", "source")) == 0:
                raise ConceptorError(f"{file}: {sw}: needs image_dir (a folder of images), metadata_file or source")
            if v["source"] is not None and v["image_dir"] is not None:
                raise ConceptorError(f"{file}: {sw}: give image_dir or source, not both (a source names its images)")
            if (v["image_column"] or v["caption_column"]) and v["source"] is None:
                raise ConceptorError(f"{file}: {sw}: image_column/caption_column name columns of a source; add "
                                     "source = 'data.csv' or remove them")
            if v["mask_dir"] is not None and not v["masks"]:
                raise ConceptorError(f"{file}: {sw}: mask_dir is set but masks is not; add masks = true")
            if v["num_repeats"] < 1:
                raise ConceptorError(f"{file}: {sw}: num_repeats is {v['num_repeats']}; it must be at least 1")
            if v["keep_tokens"] < 0:
                raise ConceptorError(f"{file}: {sw}: keep_tokens must be >= 0")
            for rate in ("caption_dropout_rate", "caption_tag_dropout_rate"):
                if not 0 <= v[rate] <= 1:
                    raise ConceptorError(f"{file}: {sw}: {rate} is {v[rate]}; it must be between 0 and 1")
            v["image_dir"] = _path(v["image_dir"], p.parent, file, sw, "image_dir")
            v["metadata_file"] = _path(v["metadata_file"], p.parent, file, sw, "metadata_file")
            v["mask_dir"] = _path(v["mask_dir"], p.parent, file, sw, "mask_dir")
            src = v["source"]
            if src is not None and (src.count("/") != 1 or src.startswith((".", "/", "~")) or src.endswith(".csv")
                                    or Path(src).expanduser().exists() or (p.parent / src).exists()):
                v["source"] = str(_path(src, p.parent, file, sw, "source"))  # local; "user/name": a hub dataset
            name = v["token"] or v["class_tokens"]
            if name is not None:
                if name in roles and roles[name][0] != v["is_reg"]:
                    raise ConceptorError(f"{file}: {sw}: {name!r} is a regularisation subset here but a concept "
                                         f"in {roles[name][1]} (or the other way round); give each role its own "
                                         "tokens")
                roles.setdefault(name, (v["is_reg"], sw))
            subsets.append(Subset(where=sw, **v))
        if not subsets:
            raise ConceptorError(f"{file}: {where} has no [[datasets.subsets]]")
        out.append(Dataset(where=where, resolution=size, subsets=subsets,
                           batch_size_given="batch_size" in ds or "batch_size" in general, **settings))
    return out

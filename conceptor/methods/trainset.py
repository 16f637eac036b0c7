"""A run's TrainingSet from its config: the dataset config file, or the one subset the shorthand flags describe.

Every method calls ``training_set``; what differs between methods is only how a subset without its own captions
is captioned (textual inversion: templates; DreamBooth: the instance prompt) and the regularisation subset
DreamBooth adds for generated class images.
"""
from __future__ import annotations

import logging

import torch

from ..config import RunConfig
from ..data.dataset import TrainingSet, load_training_set, shorthand
from ..data.dataset_config import read_dataset_config
from ..errors import ConceptorError
from ..models.load import Components

log = logging.getLogger("conceptor")


def datasets_of(cfg: RunConfig, *, class_tokens: str | None = None, captions: str | None = "auto",
                token: str | None = None, caption_dropout: float = 0.0):
    """(datasets, source name) the config describes. ``class_tokens``/``captions``/``token``: how the shorthand's
    subset is captioned (its caption_extension: "auto" reads img.txt or img.caption, None reads none)."""
    d = cfg.data
    if d.dataset_file():
        return read_dataset_config(d.dataset), str(d.dataset).replace("\\", "/").rsplit("/", 1)[-1]
    common = dict(class_tokens=class_tokens, num_repeats=d.repeats or 1, flip=d.flip_p > 0, masks=d.masks,
                  resolution=d.resolution, token=token, caption_dropout=caption_dropout)
    if d.dataset:
        return [shorthand("--dataset", source=d.dataset, image_column=d.image_column, caption_column=d.caption_column,
                          caption_extension=None, **common)], f"--dataset {d.dataset}"
    return [shorthand("--images", image_dir=d.images, caption_extension=captions, **common)], f"--images {d.images}"


def training_set(cfg: RunConfig, components: Components, datasets, source: str) -> TrainingSet:
    """Read every subset, give each item its training size, refuse what would silently do nothing, and log what
    the run will see (the first lines of every run: the same report as ``conceptor dataset check``)."""
    from ..data.report import problems, report, required_tokens

    d = cfg.data
    # --images squashes to a square as the seeds do; a source or a dataset config keeps aspect and crops
    ts = load_training_set(datasets, source, skip_bad=d.skip_bad, squash=bool(d.images), center_crop=d.center_crop)
    wanted = ts.file_batch_size()
    if wanted is not None and wanted != cfg.train.batch_size:
        raise ConceptorError(f"{source} sets batch_size {wanted} but this run's --batch-size is "
                             f"{cfg.train.batch_size}; pass --batch-size {wanted} (or remove batch_size from the file)")
    # the smallest side step: one latent cell on SD 1/2/XL (8 px); two on SD3 (2x2 patches) and Flux (2x2 packing)
    step = components.vae_scale_factor * (2 if components.flow is not None else 1)
    ts.assign_sizes(d.resolution or components.default_resolution, step, d.buckets, d.min_res, d.max_res)
    ts.hold_out(d.validation_split, cfg.train.seed)
    if ts.held_out:
        log.info("data: %d image(s) held out of training for the validation loss", len(ts.held_out))
    token = getattr(cfg.options, "token", None) or None
    bad = problems(ts, required_tokens(ts, token))
    if bad:
        raise ConceptorError(bad[0] + (f" (and {len(bad) - 1} more: conceptor dataset check shows them)"
                                       if len(bad) > 1 else ""))
    tok = components.tokenizer
    count = (lambda text: len(tok(text).input_ids)) if tok is not None else None
    for line in report(ts, count, getattr(tok, "model_max_length", None)):
        log.info("data: %s", line)
    return ts


def flip_probabilities(ts: TrainingSet, index: list[int], flip_p: float) -> torch.Tensor | float:
    """Per-row flip probability: the shorthands' --flip-p; a dataset config's flip_aug (kohya: p = 0.5)."""
    if not ts.datasets[0].config_given:
        return flip_p
    return torch.tensor([0.5 if ts.subset_of(i).flip_aug else 0.0 for i in index])


def any_flips(ts: TrainingSet, flip_p: float) -> bool:
    if not ts.datasets[0].config_given:
        return flip_p > 0
    return any(s.flip_aug for s in ts.subsets)

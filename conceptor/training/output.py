"""The run folder: whether this run may use it, and creating it (training/manifest.py lists what it wrote).

Checked before the model loads (a refusal costs nothing) and again under the folder's lock.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import RunConfig, config_from_saved
from ..errors import ConceptorError
from ..fileio import check_target, is_temp_of
from . import checkpoint as ckpt
from .lock import LOCK_NAME
from .manifest import MANIFEST, Manifest

log = logging.getLogger("conceptor")


def check_output(cfg: RunConfig) -> str:
    """Refuse to mix two runs in one folder: continue it (--resume), replace it (--overwrite) or pick another.

    Returns "new", "resume" or "replace". Called before the model loads, so a refusal costs nothing. A run
    folder is one with conceptor's manifest (training/manifest.py); a run refused before its first step
    (no config.yaml yet) is simply continued, so a retry never needs --overwrite.
    """
    out = Path(cfg.train.output)
    check_target(out, want_dir=True)
    _check_not_an_input(out, cfg)
    if not (out.is_dir() and any(not _bookkeeping(p.name) for p in out.iterdir())):
        return "new"
    manifest = Manifest.read(out)
    saved = out / "config.yaml"
    if manifest is not None and not saved.is_file():
        return "new"
    is_run = manifest is not None or _saved_method(saved) is not None  # runs from before manifests: config only
    if cfg.train.resume:
        if not is_run:
            raise ConceptorError(f"--resume: {out} is not a conceptor run (it holds files conceptor did not write); "
                                 "pass the run's folder, or an empty or new --output")
        method = _saved_method(saved)
        if method is not None and method != cfg.method:
            raise ConceptorError(f"{out} holds a {method} run; cannot resume it as {cfg.method}")
        return "resume"
    if cfg.train.overwrite and manifest is not None:
        return "replace"
    if cfg.train.overwrite:
        why = "was written by an older conceptor that kept no list of its files" if is_run else \
            "is not a conceptor run"
        raise ConceptorError(f"--output {out} {why}; refusing to delete anything in it: choose another folder")
    raise ConceptorError(f"--output {out} already holds files; pass --resume latest to continue that run, "
                         "--overwrite to replace it, or choose another --output")


def _bookkeeping(name: str) -> bool:
    """The lock, and a manifest write a kill cut short (fileio.atomic_path's temp file): a folder holding
    only these is a run killed before it wrote anything, to be continued, not refused."""
    return name == LOCK_NAME or is_temp_of(name, MANIFEST)


def _saved_method(saved: Path) -> str | None:
    """The method a run's config.yaml names; None when there is none; a damaged file is an error."""
    if not saved.is_file():
        return None
    method = config_from_saved(saved).get("method")
    if not isinstance(method, str):
        raise ConceptorError(f"{saved} is damaged (no method in it); choose another --output")
    return method


def _check_not_an_input(out: Path, cfg: RunConfig) -> None:
    """The run folder may not be, contain or lie inside anything the run reads: --overwrite and the outputs
    must never reach a user's images, class images, dataset or model."""
    inputs = cfg.input_paths()  # every field declared input=True, whichever section it is in
    here = Path(os.path.abspath(out)).resolve()
    for flag, value in inputs.items():
        if not value or not Path(value).exists():
            continue  # hub ids and missing paths are checked where they are read
        there = Path(value).resolve()
        if here == there or here in there.parents or (there.is_dir() and there in here.parents):
            relation = "is" if here == there else "contains" if here in there.parents else "lies inside"
            raise ConceptorError(f"--output {out} {relation} {flag} {value}; a run writes (and --overwrite "
                                 "deletes) in its output folder, so put it somewhere else")


def make_output(cfg: RunConfig, action: str) -> tuple[Path, Manifest]:
    """Create the run folder and its manifest; an --overwrite'd old run's own files are removed only now,
    once the new run holds the lock."""
    out = Path(cfg.train.output)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.read(out)
    if action == "replace" and manifest is not None:
        gone = manifest.remove_all()
        log.info("--overwrite: removed the %d file(s) the earlier run wrote in %s", gone, out)
        manifest = None
    if manifest is None:
        manifest = Manifest(out)
        manifest.save()
    return out, manifest


def remove_if_unused(out: Path) -> None:
    manifest = Manifest.read(out)
    if manifest is not None and not manifest.files and {p.name for p in out.iterdir()} == {MANIFEST}:
        (out / MANIFEST).unlink()
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def prune_snapshots(output: Path, limit: int | None, manifest: Manifest | None) -> None:
    """Keep step snapshots (``*-steps-N.*``) in step with the pruned checkpoints; only files this run's
    manifest lists, never a user's file that happens to match the pattern."""
    if not limit or manifest is None:
        return
    kept = {int(p.name.split("-")[1]) for p in ckpt.checkpoint_dirs(output)}
    for p in output.glob("*-steps-*.*"):
        try:
            step = int(p.stem.rsplit("-", 1)[1])
        except ValueError:
            continue
        if step not in kept and p.name in manifest.files and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)

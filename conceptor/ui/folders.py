"""The folders the page may read and write, what it finds in them, and the one check every typed path passes.

A path a user types is never opened as given: it must be relative, free of ``..``, and must still lie inside
one of the configured folders after every symlink is followed (``inside``). Files the page lists (models,
embeddings, LoRAs, runs) are offered by name; the server maps a name back to a path it found itself, so a
browser cannot name a file the page did not list.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import ConceptorError

log = logging.getLogger("conceptor")

EMBEDDING_EXTS = (".safetensors", ".pt", ".bin")  # what A1111 reads from its embeddings folder
LORA_EXTS = (".safetensors",)
SINGLE_FILE_EXTS = (".safetensors",)  # a .ckpt is a pickle: the loader refuses it, so it is not offered
BUNDLED = "conceptor toy model (bundled)"
RUN_DEPTH = 3  # runs are found this deep under --runs-dir (RUNS/job/output is two levels)


@dataclass
class Folders:
    """Where the page looks: ``runs`` always exists (jobs and generated images go there); the others may
    be None (not configured)."""

    runs: Path
    models: Path | None = None
    embeddings: Path | None = None
    loras: Path | None = None
    data: list[Path] = field(default_factory=list)  # where typed image folders / datasets may lie

    def __post_init__(self):
        self.runs = Path(self.runs).resolve()
        for name in ("models", "embeddings", "loras"):
            value = getattr(self, name)
            setattr(self, name, Path(value).resolve() if value is not None else None)
        self.data = [Path(d).resolve() for d in self.data] or [self.runs]

    @property
    def roots(self) -> list[Path]:
        """Every configured folder: a typed data path must resolve inside one of them."""
        return [p for p in (self.runs, self.models, self.embeddings, self.loras, *self.data) if p is not None]

    @property
    def images(self) -> Path:
        """Generated images: RUNS/images/<time>/, each generation in its own folder."""
        return self.runs / "images"


def inside(text: str, roots: list[Path], what: str = "path") -> Path:
    """``text`` (relative to the first root that holds it) as a resolved path inside one of ``roots``.

    Refused in one line: empty, absolute, with ``..``, with a NUL byte, or resolving (through a symlink)
    outside every root."""
    text = (text or "").strip()
    if not text:
        raise ConceptorError(f"give a {what}")
    if "\x00" in text:
        raise ConceptorError(f"the {what} contains a NUL byte; type it again")
    pure = PurePosixPath(text.replace("\\", "/"))
    if pure.is_absolute() or (len(text) > 1 and text[1] == ":"):
        raise ConceptorError(f"{what} {text!r} is absolute; give it relative to one of the page's folders "
                             f"({', '.join(str(r) for r in roots)})")
    if ".." in pure.parts:
        raise ConceptorError(f"{what} {text!r} goes up with '..'; give a path inside the page's folders")
    for root in roots:
        candidate = root / pure
        if not os.path.lexists(candidate):
            continue
        real = candidate.resolve()
        if real == root or root in real.parents:
            return real
        raise ConceptorError(f"{what} {text!r} leads outside {root} (a symlink); the page only reads inside "
                             "its folders")
    raise ConceptorError(f"{what} {text!r} is not in any of the page's folders "
                         f"({', '.join(str(r) for r in roots)})")


def _files(root: Path | None, exts: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` (recursive, as A1111 scans its folders), never following a link out of it."""
    if root is None or not root.is_dir():
        return []
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            p = Path(folder) / name
            if p.suffix.lower() in exts and not name.startswith(".") and _stays(p, root):
                found.append(p)
    return found


def _stays(p: Path, root: Path) -> bool:
    real = p.resolve()
    return real.is_file() and root in real.parents


def _run_folders(runs: Path) -> list[Path]:
    """Training run folders (conceptor's config.yaml + manifest) under ``runs``, newest first."""
    found = []
    if not runs.is_dir():
        return found
    for folder, dirs, names in os.walk(runs):
        depth = len(Path(folder).relative_to(runs).parts)
        dirs[:] = [] if depth >= RUN_DEPTH else sorted(d for d in dirs if d not in ("checkpoints", "samples")
                                                         and not d.startswith("."))
        if "config.yaml" in names and ".conceptor-run.json" in names and not Path(folder).is_symlink():
            found.append(Path(folder))
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def run_label(folder: Path, runs: Path) -> str:
    """A run's name on the page: its path under the runs folder without the job's 'output' part."""
    rel = folder.relative_to(runs)
    return str(rel.parent if rel.name == "output" and len(rel.parts) > 1 else rel)


def list_runs(f: Folders) -> dict[str, Path]:
    return {run_label(p, f.runs): p for p in _run_folders(f.runs)}


def list_models(f: Folders) -> dict[str, str]:
    """Label -> what ``api.load`` takes: the bundled model, diffusers folders and single files under the
    models folder, full-model outputs of runs, and hub ids already in the local cache."""
    from ..models.load import bundled_model_path

    models: dict[str, str] = {}
    bundled = bundled_model_path()
    if bundled is not None:
        models[BUNDLED] = str(bundled)
    if f.models is not None and f.models.is_dir():
        folders = [i.parent for i in _files(f.models, (".json",)) if i.name == "model_index.json"]
        for folder in folders:
            models[str(folder.relative_to(f.models))] = str(folder)
        for p in _files(f.models, SINGLE_FILE_EXTS):  # the weights inside a diffusers folder are not models
            if not any(d in p.parents for d in folders) and _is_checkpoint(p):
                models[str(p.relative_to(f.models))] = str(p)
    for label, run in list_runs(f).items():
        if (run / "model_index.json").is_file():
            models[f"run: {label}"] = str(run)
    for repo in cached_hub_models():
        models.setdefault(f"hub: {repo}", repo)
    return models


def _is_checkpoint(p: Path) -> bool:
    """A whole-model single file (A1111's layout, a UNet under ``model.diffusion_model.``), not a LoRA or
    VAE lying beside it. Only the safetensors header is read."""
    try:
        with open(p, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 0 < n < 100_000_000 else {}
    except (OSError, ValueError):
        return False
    return any(k.startswith("model.diffusion_model.") for k in header)


def cached_hub_models() -> list[str]:
    """Diffusers pipelines in the local hub cache (never a download): repos with a model_index.json."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache yet, or one we cannot read: the page works without it
        return []
    repos = []
    for repo in info.repos:
        if repo.repo_type == "model" and any(
                f.file_name == "model_index.json" for rev in repo.revisions for f in rev.files):
            repos.append(repo.repo_id)
    return sorted(repos)


def list_embeddings(f: Folders) -> dict[str, tuple[Path, str | None]]:
    """Token -> (file, token to give it). In the embeddings folder the token is the file's stem, as A1111
    names them; a textual-inversion run's embedding keeps the token it was trained with."""
    found: dict[str, tuple[Path, str | None]] = {}
    for p in _files(f.embeddings, EMBEDDING_EXTS):
        found.setdefault(p.stem, (p, p.stem))
    for label, run in list_runs(f).items():
        path = run / "learned_embeds.safetensors"
        token = _run_token(run)
        if path.is_file() and token:
            found.setdefault(token, (path, None))
    return found


def list_loras(f: Folders) -> dict[str, Path]:
    """Name (as written in ``<lora:NAME:WEIGHT>``) -> file: the LoRA folder's files by stem, runs by label."""
    found: dict[str, Path] = {}
    for p in _files(f.loras, LORA_EXTS):
        found.setdefault(p.stem, p)
    for label, run in list_runs(f).items():
        path = run / "pytorch_lora_weights.safetensors"
        if path.is_file():
            found.setdefault(label.replace(" ", "_"), path)
    return found


def _run_token(run: Path) -> str | None:
    from ..config import config_from_saved

    try:
        return (config_from_saved(run / "config.yaml").get("textual_inversion") or {}).get("token") or None
    except ConceptorError:
        return None

"""Resumable checkpoints: ``OUTPUT/checkpoints/step-000100/`` holds trained tensors, optimizer and scheduler
state and the step. Each folder appears atomically, so "latest" is always complete."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConceptorError
from ..fileio import atomic_dir
from ..formats.safe_load import load_tensors

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def save_checkpoint(output: Path, step: int, trained: dict[str, torch.Tensor], optimizer_state: dict,
                    scheduler_state: dict, extra: dict, limit: int | None) -> Path:
    """Write ``checkpoints/step-N`` atomically, then prune the oldest beyond ``limit``."""
    final = Path(output) / "checkpoints" / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trained.items()}, str(tmp / "trained.safetensors"))
        torch.save({"optimizer": optimizer_state, "lr_scheduler": scheduler_state}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    if limit:
        for old in checkpoint_dirs(output)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(output: Path, resume: str) -> Path | None:
    """``latest`` -> newest checkpoint in ``output`` (None when there is none); else an explicit folder."""
    if resume == "latest":
        dirs = checkpoint_dirs(output)
        return dirs[-1] if dirs else None
    p = Path(resume)
    if not (p / "state.json").is_file():
        raise ConceptorError(f"--resume {resume}: not a checkpoint folder (no state.json); pass 'latest' or "
                             "a folder like OUTPUT/checkpoints/step-000500")
    return p


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(trained tensors, optimizer/scheduler states, state.json) of a checkpoint folder."""
    # Our own file, but a checkpoint folder can come from anywhere: a code pickle is refused, never run.
    opt, _ = load_tensors(path / "optimizer.pt")
    try:
        state = json.loads((path / "state.json").read_text())
        trained = load_file(str(path / "trained.safetensors"))
    except Exception as e:  # a damaged checkpoint is the user's to delete, say which one
        raise ConceptorError(f"checkpoint {path} is damaged ({type(e).__name__}); delete it and resume from "
                             "an earlier one") from None
    return trained, opt, state

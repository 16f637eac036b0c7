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
        problem = _state_problem(state) or _optimizer_problem(opt)
    except Exception as e:  # a damaged checkpoint is the user's to delete, say which one
        problem = type(e).__name__
    if problem:
        raise ConceptorError(f"checkpoint {path} is damaged ({problem}); delete it and resume from an earlier one")
    return trained, opt, state


def _state_problem(state) -> str | None:
    if not isinstance(state, dict):
        return "state.json is not a mapping"
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"state.json step is {step!r}, not a step number"
    for key in ("grad_accum", "batch_size"):
        if key in state and (isinstance(state[key], bool) or not isinstance(state[key], int)):
            return f"state.json {key} is {state[key]!r}"
    return None


def _optimizer_problem(opt) -> str | None:
    if not all(isinstance(opt.get(k), dict) for k in ("optimizer", "lr_scheduler")):
        return "optimizer.pt lacks the optimizer or lr_scheduler state"
    return None

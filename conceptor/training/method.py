"""The small interface through which the training loop knows a method. One file per method implements it."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..config import RunConfig
from ..models.load import Components


class Method(Protocol):
    name: str

    def setup(self, components: Components, cfg: RunConfig, device: torch.device) -> list[torch.nn.Parameter]:
        """Switch on what trains, cache what can be cached; return the trainable parameters (fp32)."""

    def loss(self, micro_index: int, generator: torch.Generator) -> torch.Tensor:
        """Loss of micro-batch number ``micro_index``; all randomness comes from ``generator``."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors (what a checkpoint must hold besides optimizer state)."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save(self, folder: Path, step: int, final: bool) -> list[Path]:
        """Write user-facing outputs (final=True) or a step snapshot beside the checkpoints."""

    def prompt(self, text: str) -> str:
        """Rewrite a user prompt for the trained model (e.g. expand multi-vector tokens)."""

"""The small interface through which the training loop knows a method. One file per method implements it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..config import RunConfig
from ..models.load import Components


@dataclass(frozen=True)
class Shard:
    """Process ``rank`` of ``world`` (``accelerate launch``/torchrun) and its part of each global batch.

    A method draws all randomness for the global batch (``--batch-size`` x processes rows) and keeps the
    rows of ``rows(n)``, so N processes with batch b train on exactly what one process with batch N*b does.
    """

    rank: int = 0
    world: int = 1

    def rows(self, n: int) -> range:
        """This process's contiguous slice of a global batch of ``n`` rows (may be empty for a short batch)."""
        per = -(-n // self.world)
        start = min(n, self.rank * per)
        return range(start, min(n, start + per))

    def mean(self, per_sample: torch.Tensor, n: int) -> torch.Tensor:
        """This process's share of the global batch mean: the loop averages gradients over processes, so
        ``sum * world / n`` on each makes the average the mean over all ``n`` rows."""
        return per_sample.sum() * (self.world / n)


@dataclass
class Setup:
    """What a method's setup hands the loop."""

    groups: list[dict]  # optimizer param groups: {"params": [fp32 parameters], optionally "lr": ...}
    steps: int | None = None  # a method that counts in epochs (fine-tuning's --epochs) says how many steps


class Method(Protocol):
    name: str

    def setup(self, components: Components, cfg: RunConfig, device: torch.device, shard: Shard = Shard()) -> Setup:
        """Switch on what trains, cache what can be cached; this process trains rows ``shard`` of each batch."""

    def loss(self, micro_index: int, generator: torch.Generator) -> torch.Tensor:
        """Loss of this process's rows of micro-batch ``micro_index``; all randomness comes from ``generator``."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors (what a checkpoint must hold besides optimizer state)."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save(self, folder: Path, step: int, final: bool) -> list[Path]:
        """Write user-facing outputs (final=True) or a step snapshot beside the checkpoints."""

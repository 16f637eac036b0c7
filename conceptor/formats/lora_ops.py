"""Low-rank maths on LoRA weights (lora.py's ``LoraWeights``): resize by truncated SVD, extract from a weight
difference, and how much of each update a rank keeps.

By Eckart-Young-Mirsky (Eckart & Young 1936) the rank-R truncated SVD of an update dW is the best rank-R matrix
in Frobenius norm, and its error is exactly the discarded singular values: ||dW - dW_R||_F^2 = sum_{i>R} s_i^2.
So the errors printed here come from the spectrum, not from forming dW again. kohya's resize_lora.py and
extract_lora_from_models.py do the same SVD; we fold alpha into ``up`` as everywhere else (alpha = rank on write).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import lycoris
from .lora import _TEXT, LoraWeights, _module_of


@dataclass
class LowRank:
    """What a rank-R approximation kept, over many layers: per-layer kept energy (sum of kept s^2 / total) and the
    squared Frobenius norms summed over layers, from which the overall relative error follows."""
    kept: list[float] = field(default_factory=list)
    discarded_sq: float = 0.0  # sum over layers of ||dW - dW_R||_F^2
    total_sq: float = 0.0  # sum over layers of ||dW||_F^2

    def add(self, sigma: torch.Tensor, rank: int) -> None:
        s2 = sigma.double().pow(2)
        total, dropped = float(s2.sum()), float(s2[rank:].sum())  # summed directly: no cancellation near 1
        self.kept.append(1.0 if total == 0 else (total - dropped) / total)
        self.discarded_sq += dropped
        self.total_sq += total

    def add_exact(self, norm_sq: float) -> None:
        """A layer kept whole (its rank is already within R)."""
        self.kept.append(1.0)
        self.total_sq += norm_sq

    @property
    def relative_error(self) -> float:
        """||dW - dW_R||_F / ||dW||_F over all layers together."""
        return 0.0 if self.total_sq == 0 else math.sqrt(self.discarded_sq / self.total_sq)

    @property
    def min_kept(self) -> float:
        return min(self.kept, default=1.0)

    @property
    def mean_kept(self) -> float:
        return sum(self.kept) / len(self.kept) if self.kept else 1.0


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of ``up @ down`` without forming it when the rank r is below both sizes: with up = Qu Ru and
    down^T = Qd Rd, up @ down = Qu (Ru Rd^T) Qd^T, so only an r x r SVD is needed (O((out+in) r^2), not
    O(out in min(out, in)))."""
    up, down = up.double(), down.double()  # fp64 here costs little and keeps the tail of the spectrum honest
    r = down.shape[0]
    if r >= min(up.shape[0], down.shape[1]):
        return torch.linalg.svd(up @ down, full_matrices=False)
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    return qu @ u, s, vh @ qd.T


def svd_of(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of a full update (LoHa, LoKr, a weight difference), in fp64 on the matrix's device."""
    return torch.linalg.svd(matrix.double(), full_matrices=False)


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (down [R, in], up [out, R]) pair of the rank-R truncation, fp32 on the CPU. sqrt(s) goes to each side,
    so neither factor carries the whole scale (fp16 loaders round them alike)."""
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).float().cpu().contiguous()
    down = (root[:, None] * vh[:rank]).float().cpu().contiguous()
    return down, up


def _pair_norm_sq(up: torch.Tensor, down: torch.Tensor) -> float:
    """||up @ down||_F^2 from the r x r Gram matrices: trace((U^T U)(D D^T))."""
    up, down = up.double(), down.double()
    return float(((up.T @ up) * (down @ down.T)).sum())


def file_rank(lora: LoraWeights) -> int:
    """The largest rank any layer's update can have: resizing above it would only add zeros."""
    return max(lycoris.max_rank(layer) for layer in lora.values())


def resize(lora: LoraWeights, rank: int) -> tuple[LoraWeights, LowRank]:
    """Every layer truncated to ``rank``. LoRA: SVD of up @ down; DoRA: of its up @ down, magnitude kept (the
    error is then that of the low-rank part: the update also depends on the base weight, which a file lacks);
    LoHa/LoKr: SVD of the full update, written as a plain LoRA. LoRA/DoRA layers already within ``rank`` are
    copied unchanged."""
    out: LoraWeights = {}
    stats = LowRank()
    for name, layer in lora.items():
        kind = lycoris.kind_of(layer)
        if kind in ("lora", "dora"):
            down, up = (layer.down, layer.up) if kind == "dora" else layer
            if down.shape[0] <= rank:
                out[name] = layer
                stats.add_exact(_pair_norm_sq(up, down))
                continue
            u, s, vh = svd_of_product(up, down)
        else:
            u, s, vh = svd_of(lycoris.delta(layer))
        keep = min(rank, int(s.shape[0]))
        stats.add(s, keep)
        down, up = truncate(u, s, vh, keep)
        out[name] = lycoris.Dora(down, up, layer.magnitude) if kind == "dora" else (down, up)
    return out, stats


def low_rank_of(diff: torch.Tensor, rank: int, stats: LowRank) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` LoRA pair closest to a weight difference (ranks above its sizes keep it whole)."""
    u, s, vh = svd_of(diff)
    keep = min(rank, int(s.shape[0]))
    stats.add(s, keep)
    return truncate(u, s, vh, keep)


def module_path(prefix: str, name: str) -> str:
    """A layer's name in LoraWeights: text-encoder paths lose CLIP's ``text_model.`` level (as lora.py reads)."""
    return f"{prefix}.{_module_of(name) if prefix in _TEXT else name}"


def linear_layers(modules: dict[str, torch.nn.Module | None], targets: dict[str, list[str]]) -> dict:
    """``{LoraWeights name: nn.Linear}`` of every Linear in ``modules[prefix]`` whose path ends with one of
    ``targets[prefix]`` (peft's suffix matching, so the same layers a LoRA run would train)."""
    out = {}
    for prefix, module in modules.items():
        if module is None:
            continue
        ends = tuple(targets.get(prefix, ()))
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and any(name == e or name.endswith("." + e) for e in ends):
                out[module_path(prefix, name)] = layer
    return out


def layers_by_name(lora: LoraWeights, modules: dict[str, torch.nn.Module | None]) -> dict[str, torch.nn.Module]:
    """The module each LoRA layer name points at (names apply_lora_to resolves the same way); missing ones left
    out, apply_lora_to reports them."""
    named = {}
    for prefix, module in modules.items():
        if module is not None:
            named.update({module_path(prefix, n): m for n, m in module.named_modules()})
    return {name: named[name] for name in lora if name in named}

"""Optimizer, learning-rate schedule, EMA and the multi-process gradient average the loop uses."""
from __future__ import annotations

import logging

import torch

from ..config import RunConfig
from ..errors import ConceptorError

log = logging.getLogger("conceptor")


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """All-reduce the gradients of exactly the trained parameters, as one flat buffer (one collective per
    step, like DDP's buckets, without wrapping modules the methods call in their own ways)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    # A parameter a method has frozen for the rest of the run (pivotal tuning's vectors after --ti-frac) is left
    # out on every process alike: a zero gradient would still move it through AdamW's momentum.
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        p.grad = g


def param_groups(groups: list[dict], cfg: RunConfig, processes: int) -> list[dict]:
    """A method's param groups with their learning rates (a group may carry its own); --scale-lr scales all.

    Prodigy: every group gets --lr. Its lr multiplies the one step size it estimates for all groups, so a
    group's own AdamW rate (pivotal's 5e-4 for the vectors) would freeze that group; diffusers' advanced
    DreamBooth script overrides the text encoder's rate the same way."""
    scale = cfg.train.batch_size * cfg.train.grad_accum * processes if cfg.optim.scale_lr else 1
    own = cfg.optim.optimizer == "adamw"
    if not own and any("lr" in g for g in groups):
        log.info("--optimizer %s: every parameter group trains at --lr %g (its own learning rates are AdamW's)",
                 cfg.optim.optimizer, cfg.optim.lr)
    return [{**g, "params": list(g["params"]), "lr": (g.get("lr", cfg.optim.lr) if own else cfg.optim.lr) * scale}
            for g in groups]



def bitsandbytes(device: torch.device):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConceptorError("--use-8bit-adam needs bitsandbytes and a CUDA GPU: pip install bitsandbytes") from None
    if device.type != "cuda":
        raise ConceptorError("--use-8bit-adam needs a CUDA GPU; drop it on the CPU")
    return bnb


def make_optimizer(groups: list[dict], cfg: RunConfig, device: torch.device):
    o = cfg.optim
    kwargs = dict(betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay, eps=o.adam_epsilon)
    if o.use_8bit_adam:
        return bitsandbytes(device).optim.AdamW8bit(groups, **kwargs)
    if o.optimizer == "prodigy":
        # Bias correction and the warm-up safeguard as its authors advise for diffusion models (and diffusers'
        # advanced DreamBooth script sets): without them the early step-size estimate overshoots.
        from prodigyopt import Prodigy  # a dependency (pyproject): no missing-package path to guard

        return Prodigy(groups, use_bias_correction=True, safeguard_warmup=o.warmup > 0, **kwargs)
    # One fused kernel for all parameters on a GPU instead of a loop of small ones.
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)


EMA_PREFIX = "__ema__."


def make_ema(params: list[torch.nn.Parameter], t, device: torch.device):
    if not t.ema:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=t.ema_decay, foreach=True)
    if t.offload_ema:
        ema.to(device="cpu")
    return ema


def ema_step(ema, params, offload: bool, device: torch.device) -> None:
    if offload:  # the average lives in host memory; it visits the GPU only for its update
        ema.to(device=device, non_blocking=True)
    ema.step(params)
    if offload:
        ema.to(device="cpu", non_blocking=True)


def load_ema(ema, trained: dict[str, torch.Tensor]) -> None:
    shadows = [trained.get(f"{EMA_PREFIX}{i}") for i in range(len(ema.shadow_params))]
    if any(s is None for s in shadows):
        log.warning("checkpoint has no EMA weights; the average restarts from the current weights")
        return
    for dst, src in zip(ema.shadow_params, shadows):
        dst.data.copy_(src.to(dst.device))




def lr_scheduler(optimizer, cfg: RunConfig):
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.optim.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.optim.warmup,
                         num_training_steps=cfg.train.steps)

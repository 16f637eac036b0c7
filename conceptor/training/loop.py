"""The one training loop. It knows a method only through training/method.py's interface.

Step = one optimizer update = ``grad_accum`` micro-batches. Micro-batch i draws its data and noise from
(seed, i) alone (data/order.py), so a resumed run replays exactly what an uninterrupted run would do.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..config import RunConfig, config_from_saved
from ..data.order import step_generator
from ..errors import ConceptorError
from ..fileio import atomic_path, check_target, write_text
from ..models.load import Components
from ..sampling.grid import make_grid
from ..sampling.pipeline import sample
from . import checkpoint as ckpt
from .lock import LOCK_NAME, run_lock
from .manifest import MANIFEST, Manifest
from .method import Method, Shard
from .metrics import plot_loss, read_metrics, truncate_metrics

log = logging.getLogger("conceptor")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    output: Path
    step: int
    last_loss: float | None
    files: list[Path]


def check_output(cfg: RunConfig) -> str:
    """Refuse to mix two runs in one folder: continue it (--resume), replace it (--overwrite) or pick another.

    Returns "new", "resume" or "replace". Called before the model loads, so a refusal costs nothing. A run
    folder is one with conceptor's manifest (training/manifest.py); a run refused before its first step
    (no config.yaml yet) is simply continued, so a retry never needs --overwrite.
    """
    out = Path(cfg.train.output)
    check_target(out, want_dir=True)
    _check_not_an_input(out, cfg)
    if not (out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir())):
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


def _saved_method(saved: Path) -> str | None:
    """The method a run's config.yaml names; None when there is none; a damaged file is an error."""
    if not saved.is_file():
        return None
    try:
        prev = config_from_saved(saved)
    except (OSError, ValueError, yaml.YAMLError) as e:  # unreadable, not UTF-8, not YAML
        raise ConceptorError(f"{saved} is damaged ({type(e).__name__}); choose another --output") from None
    method = prev.get("method") if isinstance(prev, dict) else None
    if not isinstance(method, str):
        raise ConceptorError(f"{saved} is damaged (no method in it); choose another --output")
    return method


def _check_not_an_input(out: Path, cfg: RunConfig) -> None:
    """The run folder may not be, contain or lie inside anything the run reads: --overwrite and the outputs
    must never reach a user's images, class images, dataset or model."""
    inputs = {"--images": cfg.data.images, "--model": cfg.model.model, "--model-config": cfg.model.model_config,
              "--vae": cfg.model.vae}
    if cfg.dreambooth is not None:
        inputs["--class-images"] = cfg.dreambooth.class_images
    if cfg.finetune is not None:
        inputs["--dataset"] = cfg.finetune.dataset
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


def make_accelerator(mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # The accelerate state is a process-wide singleton; a library may train twice in one process
    # with different precisions, so drop the old state (keeping the distributed part).
    AcceleratorState._reset_state(reset_partial_state=False)
    # torchrun on a machine without GPUs: accelerate only picks the gloo CPU backend when told "cpu".
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _lr_scheduler(optimizer, cfg: RunConfig):
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.optim.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.optim.warmup,
                         num_training_steps=cfg.train.steps)


def validate_images(components: Components, method: Method, cfg: RunConfig, output: Path, step: int) -> Path | None:
    prompts = cfg.train.validation_prompts
    if not prompts:
        return None
    n = cfg.train.validation_images
    modes = [(m, m.training) for m in (*components.text_encoders, components.unet)]
    for m, _ in modes:
        m.eval()
    images = sample(components, [p for p in prompts for _ in range(n)], [s for _ in prompts for s in range(n)],
                    steps=cfg.train.validation_sampling_steps)
    for m, was_training in modes:
        m.train(was_training)
    path = output / "samples" / f"step-{step:06d}.png"
    with atomic_path(path) as tmp:
        make_grid(images, n).save(tmp, format="PNG")
    return path


def train(method: Method, components: Components, cfg: RunConfig) -> TrainResult:
    """Train ``method`` as ``cfg`` says, holding the output folder's lock (one run per folder)."""
    out = Path(cfg.train.output)
    check_target(out, want_dir=True)
    if int(os.environ.get("RANK", "0")) != 0:  # one lock per run: the main process holds it
        return _train(method, components, cfg)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock(out):
            return _train(method, components, cfg)
    except BaseException:
        if created:  # refused or failed before writing anything: leave no empty run folder behind
            _remove_if_unused(out)
        raise


def _remove_if_unused(out: Path) -> None:
    manifest = Manifest.read(out) if (out / MANIFEST).is_file() else None
    if manifest is not None and not manifest.files and {p.name for p in out.iterdir()} == {MANIFEST}:
        (out / MANIFEST).unlink()
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _train(method: Method, components: Components, cfg: RunConfig) -> TrainResult:
    t = cfg.train
    action = check_output(cfg)
    accelerator = make_accelerator(t.mixed_precision)
    device = accelerator.device
    if device.type == "cpu" and t.mixed_precision == "fp16":
        # accelerate has no fp16 autocast on the CPU, so half weights would meet fp32 activations.
        raise ConceptorError("--mixed-precision fp16 needs a GPU; on the CPU use bf16 or no")
    weight_dtype = DTYPES[t.mixed_precision]
    if cfg.optim.use_8bit_adam:  # before any model work: a missing dependency should cost nothing
        _bitsandbytes(device)
    components.frozen()
    for module in (*components.text_encoders, components.vae, components.unet):
        module.to(device, dtype=weight_dtype)  # frozen weights in low precision; trainables stay fp32
    if t.channels_last:  # convolution outputs follow the weights' layout, so the whole UNet runs NHWC
        components.unet.to(memory_format=torch.channels_last)

    shard = Shard(accelerator.process_index, accelerator.num_processes)
    with accelerator.main_process_first():  # caches are filled once, by the main process; the others read them
        setup = method.setup(components, cfg, device, shard)
    groups = _param_groups(setup, cfg, accelerator.num_processes)
    if t.compile:
        # In place (nn.Module.compile), after adapters are injected: weights, state-dict keys and every
        # caller stay the same object, only forward runs compiled.
        components.unet.compile()
        log.info("compiling the UNet: the first steps include compile time (reported apart)")
    params = [p for g in groups for p in g["params"]]
    # Only the main process deletes an --overwrite'd run and keeps the manifest; the others use the folder.
    output, manifest = make_output(cfg, action) if accelerator.is_main_process else (Path(t.output), None)
    record = manifest.add if manifest is not None else (lambda *paths: None)
    if cfg.dreambooth is not None and not cfg.dreambooth.class_images:
        record(output / "class_images")  # generated there by this run (or an earlier try of it)
    accelerator.wait_for_everyone()
    if any(p.dtype != torch.float32 for p in params):
        raise RuntimeError("trainable parameters must be fp32 (fp16 master weights break the grad scaler)")
    optimizer = make_optimizer(groups, cfg, device)
    scheduler = _lr_scheduler(optimizer, cfg)
    optimizer = accelerator.prepare(optimizer)
    ema = _make_ema(params, t, device)

    start = 0
    resume_from = ckpt.resolve_resume(output, t.resume) if t.resume else None
    if t.resume and resume_from is None:
        log.warning("--resume %s: no checkpoint in %s/checkpoints yet; starting from step 0", t.resume, output)
    if resume_from is not None:
        trained, opt_state, state = ckpt.load_checkpoint(resume_from)
        if ema is not None:
            _load_ema(ema, trained)
        method.load_state_dict({k: v for k, v in trained.items() if not k.startswith(EMA_PREFIX)})
        try:
            optimizer.load_state_dict(opt_state["optimizer"])
            scheduler.load_state_dict(opt_state["lr_scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ConceptorError(f"checkpoint {resume_from} holds optimizer state for other parameters "
                                 f"({type(e).__name__}); resume with the same model, method and flags") from None
        start = int(state["step"])
        if ema is not None:
            ema.optimization_step = start  # the decay warm-up continues where it was
        if (state.get("grad_accum", t.grad_accum), state.get("batch_size", t.batch_size)) != (t.grad_accum,
                                                                                               t.batch_size):
            log.warning("resuming with a different --batch-size/--grad-accum than the checkpoint; the data "
                        "order from here on differs from an uninterrupted run")
        if start > t.steps:
            raise ConceptorError(f"checkpoint {resume_from.name} is already at step {start}; pass --steps larger "
                                 f"than {start} to train further")
        if start == t.steps:  # trained to the end but perhaps killed while writing outputs: write them again
            log.info("%s is the last step; writing the final outputs from it", resume_from)
        else:
            log.info("resuming from %s at step %d", resume_from, start)
    metrics_path = output / "metrics.jsonl"
    if accelerator.is_main_process:
        truncate_metrics(metrics_path, start)
        write_text(output / "config.yaml", cfg.to_yaml())
        record(output / "config.yaml", metrics_path)

    if start == 0 and accelerator.is_main_process:
        record(validate_images(components, method, cfg, output, 0))

    last_loss = None
    window, window_n = torch.zeros((), device=device), 0
    bar = tqdm(total=t.steps, initial=start, desc=method.name, unit="step", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    t0 = time.perf_counter()
    for step in range(start + 1, t.steps + 1):
        for k in range(t.grad_accum):
            micro = (step - 1) * t.grad_accum + k
            try:
                with accelerator.autocast():
                    loss = method.loss(micro, step_generator(t.seed, micro))
                accelerator.backward(loss / t.grad_accum)
            except torch.cuda.OutOfMemoryError:
                raise ConceptorError(
                    f"out of GPU memory at step {step}; reduce memory with --gradient-checkpointing, "
                    "--mixed-precision bf16, --use-8bit-adam, --lora, or a smaller --batch-size with --grad-accum "
                    "(or --resolution); checkpoints so far are kept, continue with --resume latest") from None
            window += loss.detach()
            window_n += 1
        if accelerator.num_processes > 1:
            _average_gradients(params, accelerator.num_processes)
        if cfg.optim.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            _ema_step(ema, params, t.offload_ema, device)

        if step % t.log_every == 0 or step == t.steps:
            last_loss = (window / window_n).item()  # the only host sync of the hot loop
            if not math.isfinite(last_loss):
                raise ConceptorError(f"loss became {last_loss} at step {step}; lower --lr or use "
                                     "--mixed-precision bf16, then --resume latest from the last checkpoint")
            window, window_n = torch.zeros((), device=device), 0
            row = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                   "elapsed_s": round(time.perf_counter() - t0, 3)}
            if accelerator.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{row['lr']:.2e}")
        bar.update(1)
        if step == start + 1 and t.compile:
            log.info("first step took %.1f s (includes compilation)", time.perf_counter() - t0)

        is_last = step == t.steps
        if accelerator.is_main_process and ((t.checkpoint_every and step % t.checkpoint_every == 0) or is_last):
            if window_n and not torch.isfinite(window).item():  # never checkpoint weights a NaN step touched
                raise ConceptorError(f"loss became NaN/inf before step {step}; the last good checkpoint is kept. "
                                     "Lower --lr or use --mixed-precision bf16, then --resume latest")
            record(*method.save(output, step, final=False))
            trained = method.state_dict()
            if ema is not None:
                trained.update({f"{EMA_PREFIX}{i}": s for i, s in enumerate(ema.shadow_params)})
            saved = ckpt.save_checkpoint(output, step, trained, optimizer.state_dict(), scheduler.state_dict(),
                                         {"grad_accum": t.grad_accum, "batch_size": t.batch_size,
                                          "micro_batches_done": step * t.grad_accum, "seed": t.seed},
                                         t.checkpoints_limit)
            record(saved)
            _prune_snapshots(output, t.checkpoints_limit, manifest)
        if accelerator.is_main_process and t.validation_every and step % t.validation_every == 0 and not is_last:
            record(validate_images(components, method, cfg, output, step))
    bar.close()

    files: list[Path] = []
    if accelerator.is_main_process:
        if ema is not None:
            # The average is the output; the raw last weights go to OUTPUT/raw for comparison.
            files = method.save(output / "raw", t.steps, final=True)
            ema.store(params)
            ema.copy_to(params)
            files += method.save(output, t.steps, final=True)
        else:
            files = method.save(output, t.steps, final=True)
        record(*files, validate_images(components, method, cfg, output, t.steps))
        plot_loss(read_metrics(metrics_path), output / "loss.png")
        record(output / "loss.png")
    accelerator.wait_for_everyone()
    return TrainResult(output=output, step=t.steps, last_loss=last_loss, files=files)


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """All-reduce the gradients of exactly the trained parameters, as one flat buffer (one collective per
    step, like DDP's buckets, without wrapping modules the methods call in their own ways)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        p.grad = g


def _param_groups(setup_result: list, cfg: RunConfig, processes: int) -> list[dict]:
    """A method returns parameters or param groups (a group may carry its own lr); --scale-lr scales all."""
    groups = setup_result if setup_result and isinstance(setup_result[0], dict) else [{"params": setup_result}]
    scale = cfg.train.batch_size * cfg.train.grad_accum * processes if cfg.optim.scale_lr else 1
    return [{**g, "params": list(g["params"]), "lr": g.get("lr", cfg.optim.lr) * scale} for g in groups]


def _bitsandbytes(device: torch.device):
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
        return _bitsandbytes(device).optim.AdamW8bit(groups, **kwargs)
    # One fused kernel for all parameters on a GPU instead of a loop of small ones.
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)


EMA_PREFIX = "__ema__."


def _make_ema(params: list[torch.nn.Parameter], t, device: torch.device):
    if not t.ema:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=t.ema_decay, foreach=True)
    if t.offload_ema:
        ema.to(device="cpu")
    return ema


def _ema_step(ema, params, offload: bool, device: torch.device) -> None:
    if offload:  # the average lives in host memory; it visits the GPU only for its update
        ema.to(device=device, non_blocking=True)
    ema.step(params)
    if offload:
        ema.to(device="cpu", non_blocking=True)


def _load_ema(ema, trained: dict[str, torch.Tensor]) -> None:
    shadows = [trained.get(f"{EMA_PREFIX}{i}") for i in range(len(ema.shadow_params))]
    if any(s is None for s in shadows):
        log.warning("checkpoint has no EMA weights; the average restarts from the current weights")
        return
    for dst, src in zip(ema.shadow_params, shadows):
        dst.data.copy_(src.to(dst.device))


def _prune_snapshots(output: Path, limit: int | None, manifest: Manifest | None) -> None:
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

"""The one training loop. It knows a method only through training/method.py's interface.

Step = one optimizer update = ``grad_accum`` micro-batches. Micro-batch i draws its data and noise from
(seed, i) alone (data/order.py), so a resumed run replays exactly what an uninterrupted run would do.
In named parts: ``_set_up`` (devices, the method, the folder, optimizer), ``_resume``, ``_step``,
``_log``, ``_checkpoint`` and ``_finish``; ``train`` runs them under the folder's lock.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data.order import step_generator
from ..errors import ConceptorError
from ..families import check_family_options
from ..fileio import atomic_path, check_target, write_text
from ..models.load import Components
from ..models.quantize import quantize_base
from ..sampling.grid import make_grid
from ..sampling.pipeline import sample
from . import checkpoint as ckpt
from . import optim, trackers
from .lock import run_lock
from .manifest import Manifest
from .method import Method, Shard
from .metrics import plot_loss, read_metrics, truncate_metrics
from .output import check_output, make_output, prune_snapshots, remove_if_unused

log = logging.getLogger("conceptor")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    output: Path
    step: int
    last_loss: float | None
    files: list[Path]


@dataclass
class _Run:
    """Everything the parts of one run share."""

    method: Method
    components: Components
    cfg: RunConfig
    accelerator: Any
    output: Path
    manifest: Manifest | None
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    ema: Any
    scorer: Any = None  # --eval-every's scores besides the validation loss (eval/during.py)
    window: torch.Tensor = None  # summed loss since the last log (on the device: no host sync per step)
    window_n: int = 0
    last_loss: float | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def record(self, *paths) -> None:
        """Add what this run wrote to its manifest (the main process keeps it)."""
        if self.manifest is not None:
            self.manifest.add(*paths)


def make_accelerator(mixed_precision: str, log_with: str | None = None, project_dir: Path | None = None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # The accelerate state is a process-wide singleton; a library may train twice in one process
    # with different precisions, so drop the old state (keeping the distributed part).
    AcceleratorState._reset_state(reset_partial_state=False)
    # torchrun on a machine without GPUs: accelerate only picks the gloo CPU backend when told "cpu".
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, log_with=log_with,
                       project_dir=str(project_dir) if project_dir is not None else None)


def validate_images(components: Components, cfg: RunConfig, output: Path, step: int) -> Path | None:
    prompts = cfg.train.validation_prompts
    if not prompts:
        return None
    n = cfg.train.validation_images
    modes = [(m, m.training) for m in (*components.text_encoders, components.denoiser)]
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


def train(method: Method, components: Components, cfg: RunConfig, scorer=None) -> TrainResult:
    """Train ``method`` as ``cfg`` says, holding the output folder's lock (one run per folder). ``scorer``
    (components, step) -> {metric: value}: what --eval-every measures besides the validation loss (eval/during.py
    builds it: the loop knows no evaluator)."""
    out = Path(cfg.train.output)
    check_target(out, want_dir=True)
    if int(os.environ.get("RANK", "0")) != 0:  # one lock per run: the main process holds it
        return _train(method, components, cfg, scorer)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock(out):
            return _train(method, components, cfg, scorer)
    except BaseException:
        if created:  # refused or failed before writing anything: leave no empty run folder behind
            remove_if_unused(out)
        raise


def _train(method: Method, components: Components, cfg: RunConfig, scorer=None) -> TrainResult:
    run = _set_up(method, components, cfg)
    run.scorer = scorer
    trackers.start(run.accelerator, cfg)
    t = cfg.train
    start = _resume(run)
    if run.main:
        truncate_metrics(run.output / "metrics.jsonl", start)
        write_text(run.output / "config.yaml", cfg.to_yaml())
        run.record(run.output / "config.yaml", run.output / "metrics.jsonl")
        if start == 0:
            _grid(run, 0)
            _validation_loss(run, 0)
    bar = tqdm(total=t.steps, initial=start, desc=method.name, unit="step", dynamic_ncols=True,
               disable=not run.accelerator.is_local_main_process)
    run.started = time.perf_counter()
    for step in range(start + 1, t.steps + 1):
        _step(run, step)
        if step % t.log_every == 0 or step == t.steps:
            _log(run, step, bar)
        bar.update(1)
        if step == start + 1 and t.compile:
            log.info("first step took %.1f s (includes compilation)", time.perf_counter() - run.started)
        is_last = step == t.steps
        if run.main and ((t.checkpoint_every and step % t.checkpoint_every == 0) or is_last):
            _checkpoint(run, step)
        if run.main and t.validation_every and step % t.validation_every == 0 and not is_last:
            _grid(run, step)
            _validation_loss(run, step)
        if run.main and t.eval_every and step % t.eval_every == 0 and not is_last:
            _evaluate(run, step)
    bar.close()
    files = _finish(run) if run.main else []
    run.accelerator.wait_for_everyone()
    trackers.end(run.accelerator, cfg)
    return TrainResult(output=run.output, step=t.steps, last_loss=run.last_loss, files=files)


def _set_up(method: Method, components: Components, cfg: RunConfig) -> _Run:
    """Devices and precision, the method's trainables, the run folder, optimizer, schedule and EMA."""
    t = cfg.train
    if t.min_timestep is None:  # the method's window is of a UNet's DDPM schedule; flow models draw their own
        from ..methods import get_spec

        window = get_spec(cfg.method).min_timestep
        t.min_timestep = (window(cfg) if callable(window) else window) if components.flow is None else 0
    check_family_options(components, cfg)  # before the folder is touched: nothing written on a refused option
    if cfg.lora is not None and cfg.lora.enabled:  # an adapter the layers cannot take: refused here too
        from ..models.adapters import check_adapters, trainable_text_encoders

        text = trainable_text_encoders(components) if cfg.lora.text_encoder else {}
        check_adapters({components.denoiser_name: components.denoiser, **text}, cfg.lora, components.flow,
                       t.quantize)
    action = check_output(cfg)  # again, now under the lock: the folder may have changed since the api's check
    trackers.check(t.log_with)  # a missing package costs nothing: before any model work
    accelerator = make_accelerator(t.mixed_precision, t.log_with, Path(t.output) / "logs" if t.log_with else None)
    device = accelerator.device
    if device.type == "cpu" and t.mixed_precision == "fp16":
        # accelerate has no fp16 autocast on the CPU, so half weights would meet fp32 activations.
        raise ConceptorError("--mixed-precision fp16 needs a GPU; on the CPU use bf16 or no")
    if cfg.optim.use_8bit_adam:  # before any model work: a missing dependency should cost nothing
        optim.bitsandbytes(device)
    # The manifest first: setup may write into the folder (DreamBooth's class images), and a run killed there
    # must leave a folder that a retry or --resume recognises as its own. Only a replaced run's old files
    # wait until setup is done (it may reuse them), as before.
    early = make_output(cfg, action) if action != "replace" and accelerator.is_main_process else None
    components.frozen()
    # T5-XXL (SD3, Flux) stays in CPU memory: it encodes a few prompts at setup and for validation, and on
    # the GPU its 9.5 GB (bf16) would sit beside the transformer for the whole run.
    t5 = components.flow.t5(components) if components.flow is not None else None
    for module in (*components.text_encoders, components.vae, components.denoiser):
        # frozen weights in low precision (T5 overflows in fp16: bf16 there); trainables fp32
        dtype = torch.bfloat16 if module is t5 and t.mixed_precision == "fp16" else DTYPES[t.mixed_precision]
        # a base to quantize is cast where it is and quantized onto the device layer by layer, so its
        # full-precision weights never have to fit the GPU at once
        module.to("cpu" if module is t5 or (t.quantize and module is components.denoiser) else device, dtype=dtype)
    if t.quantize:
        n = quantize_base(components.denoiser, t.quantize, device=device)
        log.info("%s: %d Linear layers stored in %s", components.denoiser_name, n, t.quantize)
    if t.channels_last and components.unet is not None:  # convolution outputs follow the weights' layout
        components.unet.to(memory_format=torch.channels_last)
    with accelerator.main_process_first():  # caches are filled once, by the main process; the others read them
        setup = method.setup(components, cfg, device, Shard(accelerator.process_index, accelerator.num_processes))
    if setup.steps is not None:  # the method counts in epochs: the run (and its saved config) gets the steps
        t.steps = setup.steps
    groups = optim.param_groups(setup.groups, cfg, accelerator.num_processes)
    if t.compile:
        # In place (nn.Module.compile), after adapters are injected: weights, state-dict keys and every
        # caller stay the same object, only forward runs compiled.
        components.denoiser.compile()
        log.info("compiling the %s: the first steps include compile time (reported apart)", components.denoiser_name)
    params = [p for g in groups for p in g["params"]]
    if any(p.dtype != torch.float32 for p in params):
        raise RuntimeError("trainable parameters must be fp32 (fp16 master weights break the grad scaler)")
    # Only the main process deletes an --overwrite'd run and keeps the manifest; the others use the folder.
    if not accelerator.is_main_process:
        output, manifest = Path(t.output), None
    else:
        output, manifest = early or make_output(cfg, action)
    if manifest is not None and (output / "class_images").is_dir():
        manifest.add(output / "class_images")  # generated there by this run (or an earlier try of it)
    accelerator.wait_for_everyone()
    optimizer = optim.make_optimizer(groups, cfg, device)
    scheduler = optim.lr_scheduler(optimizer, cfg)
    return _Run(method, components, cfg, accelerator, output, manifest, params, accelerator.prepare(optimizer),
                scheduler, optim.make_ema(params, t, device), window=torch.zeros((), device=device))


def _resume(run: _Run) -> int:
    """Load the checkpoint --resume names into the method, optimizer, schedule and EMA; the step to go on from."""
    t = run.cfg.train
    resume_from = ckpt.resolve_resume(run.output, t.resume) if t.resume else None
    if t.resume and resume_from is None:
        log.warning("--resume %s: no checkpoint in %s/checkpoints yet; starting from step 0", t.resume, run.output)
    if resume_from is None:
        return 0
    trained, opt_state, state = ckpt.load_checkpoint(resume_from)
    if run.ema is not None:
        optim.load_ema(run.ema, trained)
    run.method.load_state_dict({k: v for k, v in trained.items() if not k.startswith(optim.EMA_PREFIX)})
    try:
        run.optimizer.load_state_dict(opt_state["optimizer"])
        run.scheduler.load_state_dict(opt_state["lr_scheduler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ConceptorError(f"checkpoint {resume_from} holds optimizer state for other parameters "
                             f"({type(e).__name__}); resume with the same model, method and flags") from None
    start = int(state["step"])
    if run.ema is not None:
        run.ema.optimization_step = start  # the decay warm-up continues where it was
    if (state.get("grad_accum", t.grad_accum), state.get("batch_size", t.batch_size)) != (t.grad_accum, t.batch_size):
        log.warning("resuming with a different --batch-size/--grad-accum than the checkpoint; the data "
                    "order from here on differs from an uninterrupted run")
    if start > t.steps:
        raise ConceptorError(f"checkpoint {resume_from.name} is already at step {start}; pass --steps larger "
                             f"than {start} to train further")
    if start == t.steps:  # trained to the end but perhaps killed while writing outputs: write them again
        log.info("%s is the last step; writing the final outputs from it", resume_from)
    else:
        log.info("resuming from %s at step %d", resume_from, start)
    return start


def _step(run: _Run, step: int) -> None:
    """One optimizer update: ``grad_accum`` micro-batches, the gradient average across processes, clipping."""
    t, accelerator = run.cfg.train, run.accelerator
    for k in range(t.grad_accum):
        micro = (step - 1) * t.grad_accum + k
        try:
            with accelerator.autocast():
                loss = run.method.loss(micro, step_generator(t.seed, micro))
            accelerator.backward(loss / t.grad_accum)
        except torch.cuda.OutOfMemoryError:
            raise ConceptorError(
                f"out of GPU memory at step {step}; reduce memory with --gradient-checkpointing, "
                "--mixed-precision bf16, --use-8bit-adam, --lora, or a smaller --batch-size with --grad-accum "
                "(or --resolution); checkpoints so far are kept, continue with --resume latest") from None
        run.window += loss.detach()
        run.window_n += 1
    if accelerator.num_processes > 1:
        optim.average_gradients(run.params, accelerator.num_processes)
    if run.cfg.optim.max_grad_norm:
        accelerator.clip_grad_norm_(run.params, run.cfg.optim.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        optim.ema_step(run.ema, run.params, t.offload_ema, accelerator.device)


def _log(run: _Run, step: int, bar) -> None:
    """The mean loss since the last log to metrics.jsonl and the bar; a NaN/inf loss stops the run here."""
    run.last_loss = (run.window / run.window_n).item()  # the only host sync of the hot loop
    if not math.isfinite(run.last_loss):
        raise ConceptorError(f"loss became {run.last_loss} at step {step}; lower --lr or use "
                             "--mixed-precision bf16, then --resume latest from the last checkpoint")
    run.window, run.window_n = torch.zeros_like(run.window), 0
    row = {"step": step, "loss": run.last_loss, "lr": run.scheduler.get_last_lr()[0],
           "elapsed_s": round(time.perf_counter() - run.started, 3)}
    if run.main:
        with open(run.output / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        trackers.log(run.accelerator, run.cfg, {"train/loss": row["loss"], "train/lr": row["lr"]}, step)
    bar.set_postfix(loss=f"{run.last_loss:.4f}", lr=f"{row['lr']:.2e}")


def _grid(run: _Run, step: int) -> None:
    """The validation grid of this step (validate_images), recorded in the manifest and sent to the tracker."""
    path = validate_images(run.components, run.cfg, run.output, step)
    if path is not None:
        run.record(path)
        from PIL import Image

        with Image.open(path) as im:
            trackers.log_grid(run.accelerator, run.cfg, im.convert("RGB"), step)


def _validation_loss(run: _Run, step: int) -> float | None:
    """The method's fixed-noise validation loss (methods/denoise.py) into metrics.jsonl beside the training loss:
    at the start, every --validation-every steps and at the end (of the weights the run saves)."""
    measure = getattr(run.method, "validation_loss", None)
    value = measure() if measure is not None else None
    if value is None:
        return None
    with open(run.output / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "val_loss": value}) + "\n")
    log.info("step %d: validation loss %.5f", step, value)
    trackers.log(run.accelerator, run.cfg, {"validation/loss": value}, step)
    return value


def _evaluate(run: _Run, step: int) -> dict:
    """--eval-every: the validation loss and the scorer's metrics into metrics.jsonl; with --keep-best a better
    score stores the method's weights in OUTPUT/best (trained.safetensors + best.json), which survives a resume."""
    t = run.cfg.train
    scores = {}
    measure = getattr(run.method, "validation_loss", None)
    value = measure() if measure is not None else None
    if value is not None:
        scores["val_loss"] = value
    if run.scorer is not None:
        scores.update(run.scorer(run.components, step))
    with open(run.output / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "eval": scores}) + "\n")
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    trackers.log(run.accelerator, run.cfg, {f"eval/{k}": v for k, v in scores.items()}, step)
    metric = t.keep_best
    if metric is None:
        return scores
    if metric not in scores:
        raise ConceptorError(f"--keep-best {metric}: the evaluation at step {step} gave no {metric} "
                             f"(it gave {', '.join(scores) or 'nothing'}); choose one of those")
    best = _read_best(run.output)
    lower = metric in ("val_loss",)
    if best is None or (scores[metric] < best["score"] if lower else scores[metric] > best["score"]):
        from safetensors.torch import save_file

        folder = run.output / "best"
        with atomic_path(folder / "trained.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in run.method.state_dict().items()}, str(tmp))
        write_text(folder / "best.json", json.dumps({"metric": metric, "step": step, "score": scores[metric]}))
        run.record(folder / "trained.safetensors", folder / "best.json")
    return scores


def _read_best(output: Path) -> dict | None:
    path = output / "best" / "best.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:  # damaged: scored again from here on
        return None


def _keep_best(run: _Run) -> None:
    """--keep-best: when an earlier step scored better than the last, its weights become the run's output (the
    last step's files go to OUTPUT/last)."""
    best = _read_best(run.output)
    if run.cfg.train.keep_best is None or best is None:
        return
    if best["step"] == run.cfg.train.steps:
        log.info("--keep-best %s: the last step is the best (%.4g)", best["metric"], best["score"])
        return
    from safetensors.torch import load_file

    run.record(*run.method.save(run.output / "last", run.cfg.train.steps, final=True))
    run.method.load_state_dict(load_file(str(run.output / "best" / "trained.safetensors")))
    log.info("--keep-best %s: keeping step %d (%.4g) as the output; the last step's files are in %s",
             best["metric"], best["step"], best["score"], run.output / "last")


def _checkpoint(run: _Run, step: int) -> None:
    """A step snapshot of the outputs and a resumable checkpoint, never of weights a NaN step touched."""
    t = run.cfg.train
    if run.window_n and not torch.isfinite(run.window).item():
        raise ConceptorError(f"loss became NaN/inf before step {step}; the last good checkpoint is kept. "
                             "Lower --lr or use --mixed-precision bf16, then --resume latest")
    run.record(*run.method.save(run.output, step, final=False))
    trained = run.method.state_dict()
    if run.ema is not None:
        trained.update({f"{optim.EMA_PREFIX}{i}": s for i, s in enumerate(run.ema.shadow_params)})
    saved = ckpt.save_checkpoint(run.output, step, trained, run.optimizer.state_dict(), run.scheduler.state_dict(),
                                 {"grad_accum": t.grad_accum, "batch_size": t.batch_size,
                                  "micro_batches_done": step * t.grad_accum, "seed": t.seed}, t.checkpoints_limit)
    run.record(saved)
    prune_snapshots(run.output, t.checkpoints_limit, run.manifest)


def _finish(run: _Run) -> list[Path]:
    """The final outputs (the EMA average, when kept, with the raw weights in OUTPUT/raw), grid and curve."""
    method, steps, output = run.method, run.cfg.train.steps, run.output
    if run.cfg.train.eval_every:
        _evaluate(run, steps)
        _keep_best(run)
    if run.ema is not None:
        files = method.save(output / "raw", steps, final=True)
        run.ema.store(run.params)
        run.ema.copy_to(run.params)
        files += method.save(output, steps, final=True)
    else:
        files = method.save(output, steps, final=True)
    run.record(*files)
    _grid(run, steps)
    if run.cfg.train.log_with == "tensorboard":
        run.record(output / "logs")  # the event files: this run's, removed with it by --overwrite
    _validation_loss(run, steps)
    plot_loss(read_metrics(output / "metrics.jsonl", every_row=True), output / "loss.png")
    run.record(output / "loss.png")
    return files


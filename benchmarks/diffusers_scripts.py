"""Run diffusers' own example training scripts, unchanged, so their learning curves can be set beside conceptor's.

``examples/textual_inversion/textual_inversion.py`` and ``examples/dreambooth/train_dreambooth_lora.py`` are
copied byte for byte from the local diffusers mirror (``git show <commit>:<path>``) into a cache folder, with
a ``<name>.source.json`` beside each naming the mirror commit and the file's sha256; the text is never
edited (a cached copy whose hash differs from the mirror's is rewritten). Each run is one subprocess
``sys.executable script.py ...`` (no ``accelerate launch``: the scripts build their own Accelerator, which on
a plain CPU machine is one process), with HF_HUB_OFFLINE=1, no ACCELERATE_* variables from the parent, and
stdout/stderr in ``out/log.txt``; the exact command line goes to ``out/command.txt``.

Why ``benchmarks/torchvision_shim``: both scripts do ``from torchvision import transforms``, and torchvision
cannot be installed beside this environment's locally built torch. The shim is a minimal
``torchvision.transforms`` (Compose, Resize, CenterCrop, RandomCrop, RandomHorizontalFlip, ToTensor, Normalize,
InterpolationMode) with torchvision's semantics, drawing from torch's global RNG as torchvision does. Only the
script's subprocess gets it, through ``torchvision_shim/startup`` on PYTHONPATH, whose sitecustomize serves
the package to the script's own ``import torchvision`` and to nothing else: transformers, accelerate and
diffusers probe ``importlib.util.find_spec("torchvision")`` and, told yes, import torchvision.io,
transforms.v2 etc. So to them torchvision stays absent, as it is here. conceptor never sees the shim. (With a
real torchvision installed, the script would still get the shim, so runs are alike everywhere.)

Flags. Besides the ones a caller gives, ``conceptor_flags=True`` (the default) passes the scripts' flags for
the settings where conceptor's defaults differ from the script's: ``--adam_weight_decay 0`` (conceptor's
``optim.weight_decay`` is 0.0; the scripts' 1e-2), and for DreamBooth-LoRA ``--max_grad_norm inf`` (conceptor
clips nothing by default; the script always clips at 1.0; clipping at inf is an exact no-op). Both scripts
already default to ``--scale_lr`` off; the schedule and warm-up are the caller's (``lr_scheduler``, ``warmup``:
conceptor's), and ``lr=None`` leaves the script's own default rate (1e-4 for textual inversion, 5e-4 for
DreamBooth-LoRA). ``conceptor_flags=False`` keeps the
scripts' own values. What cannot be matched by a flag: textual_inversion.py resizes every image to a square
``resolution`` (bicubic, no crop), flips with p=0.5 and captions with its 27 "imagenet_templates_small"
("a photo of a {}", ...); train_dreambooth_lora.py resizes the shorter side (lanczos) and random-crops, with
no flips, captions every image with the one instance prompt, and puts LoRA (alpha = rank, gaussian init)
on to_q/to_k/to_v/to_out.0 (+ add_k_proj/add_v_proj where present) of the UNet only.

``read_scalars(out)`` reads the loss / lr the scripts log each step (their default ``--report_to
tensorboard``) with wall times, for learning curves and time per step.

Run ``python benchmarks/diffusers_scripts.py [work]`` for a smoke: both scripts, 4 steps, saving every 2.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM = HERE / "torchvision_shim" / "startup"  # its sitecustomize serves ../torchvision to the script only
MIRROR = Path(os.environ.get("DIFFUSERS_MIRROR", "/work/.mirror/huggingface+diffusers/repo"))
SCRIPTS = {
    "textual_inversion": "examples/textual_inversion/textual_inversion.py",
    "train_dreambooth_lora": "examples/dreambooth/train_dreambooth_lora.py",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _git(*args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={MIRROR}", *args], check=True, capture_output=True).stdout


def script(name: str, cache: Path, commit: str = "HEAD") -> Path:
    """diffusers' example ``name`` (a key of SCRIPTS) copied byte for byte from the mirror into ``cache``."""
    rel = SCRIPTS[name]
    sha = _git("rev-parse", f"{commit}^{{commit}}").decode().strip()
    text = _git("show", f"{sha}:{rel}")
    digest = hashlib.sha256(text).hexdigest()
    cache.mkdir(parents=True, exist_ok=True)
    path, meta = cache / f"{name}.py", cache / f"{name}.source.json"
    if not (path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest):
        path.write_bytes(text)
    meta.write_text(json.dumps({"repo": "huggingface/diffusers", "commit": sha, "path": rel, "sha256": digest},
                               indent=2) + "\n")
    return path


def _images_only(images: Path, staging: Path) -> Path:
    """The scripts take every file of their folder as an image: a folder holding anything else (masks,
    captions, metadata) is replaced by a copy of just its images."""
    files = sorted(p for p in Path(images).iterdir())
    keep = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask")]
    if not keep:
        raise FileNotFoundError(f"no images in {images}")
    if keep == files:
        return Path(images).resolve()
    staging.mkdir(parents=True, exist_ok=True)
    for p in keep:
        shutil.copy2(p, staging / p.name)
    return staging.resolve()


def _model_arg(model: str) -> str:
    """A local model folder as an absolute path (the script runs in ``out``); a hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else str(model)


def _prepare_out(out: Path, overwrite: bool) -> Path:
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (overwrite=True clears it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run(name: str, args: list[str], out: Path, scripts: Path | None) -> float:
    path = script(name, scripts if scripts is not None else out.parent / "scripts")
    source = json.loads(path.with_suffix(".source.json").read_text())
    cmd = [sys.executable, str(path), *args]
    (out / "command.txt").write_text(
        shlex.join(cmd) + "\n" + f"# diffusers {source['commit']} {source['path']} sha256 {source['sha256']}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(SHIM), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    with open(out / "log.txt", "wb") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        tail = (out / "log.txt").read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(f"{path.name} failed (exit {rc}); last lines of {out / 'log.txt'}:\n" + "\n".join(tail))
    (out / "wall.json").write_text(json.dumps({"wall_s": round(wall, 3)}) + "\n")
    return wall


def _with_final(saved: list[tuple[int, Path]], steps: int, final: Path) -> list[tuple[int, Path]]:
    """Periodic saves by step, the final file last (as step ``steps``; a periodic save of that same step,
    which holds the same weights, is left out so each step appears once)."""
    if not final.is_file():
        raise RuntimeError(f"the script finished without writing {final}")
    return sorted((s, p) for s, p in saved if s != steps) + [(steps, final)]


def _lr_flags(lr: float | None, scheduler: str, warmup: int) -> list[str]:
    """The schedule as conceptor's; the learning rate unless None (the script's own default: conceptor's rate
    means something else under --optimizer prodigy, which neither script has)."""
    flags = ["--lr_scheduler", scheduler, "--lr_warmup_steps", str(warmup)]
    return flags if lr is None else ["--learning_rate", repr(float(lr)), *flags]


def run_textual_inversion(model: str, images: Path, out: Path, *, token: str, init_token: str, steps: int, seed: int,
                          lr: float | None, batch_size: int, resolution: int, save_every: int,
                          lr_scheduler: str = "constant", warmup: int = 0, extra: list[str] = [],
                          conceptor_flags: bool = True, scripts: Path | None = None,
                          overwrite: bool = False) -> list[tuple[int, Path]]:
    """textual_inversion.py on ``images``; [(step, learned_embeds-steps-N.safetensors)] and the final
    learned_embeds.safetensors last. Each file is {token: [num_vectors, dim]} (diffusers' layout)."""
    out = _prepare_out(out, overwrite)
    data = _images_only(Path(images), out / "instance_images")
    args = ["--pretrained_model_name_or_path", _model_arg(model), "--train_data_dir", str(data),
            "--placeholder_token", token, "--initializer_token", init_token, "--learnable_property", "object",
            "--resolution", str(resolution), "--train_batch_size", str(batch_size), "--max_train_steps", str(steps),
            *_lr_flags(lr, lr_scheduler, warmup),
            "--seed", str(seed), "--output_dir", str(out), "--save_steps", str(save_every),
            "--mixed_precision", "no", "--dataloader_num_workers", "0"]
    if conceptor_flags:
        args += ["--adam_weight_decay", "0.0"]
    _run("textual_inversion", args + list(extra), out, scripts)
    saved = [(int(p.stem.rsplit("-", 1)[1]), p) for p in out.glob("learned_embeds-steps-*.safetensors")]
    return _with_final(saved, steps, out / "learned_embeds.safetensors")


def run_dreambooth_lora(model: str, images: Path, out: Path, *, instance_prompt: str, class_prompt: str | None,
                        class_dir: Path | None, num_class_images: int, steps: int, seed: int, lr: float | None,
                        rank: int, batch_size: int, resolution: int, save_every: int, lr_scheduler: str = "constant",
                        warmup: int = 0, extra: list[str] = [],
                        conceptor_flags: bool = True, scripts: Path | None = None,
                        overwrite: bool = False) -> list[tuple[int, Path]]:
    """train_dreambooth_lora.py on ``images`` (prior preservation, weight 1.0, when ``class_prompt`` is given:
    the script generates class images into ``class_dir``, default ``out/class_images``, until it holds
    ``num_class_images``); [(step, checkpoint-N/pytorch_lora_weights.safetensors)] and the final
    out/pytorch_lora_weights.safetensors last. The checkpoints also hold the optimizer, lr-scheduler and RNG
    states (accelerate's save_state); none is deleted."""
    out = _prepare_out(out, overwrite)
    data = _images_only(Path(images), out / "instance_images")
    args = ["--pretrained_model_name_or_path", _model_arg(model), "--instance_data_dir", str(data),
            "--instance_prompt", instance_prompt, "--output_dir", str(out),
            "--resolution", str(resolution), "--train_batch_size", str(batch_size), "--max_train_steps", str(steps),
            *_lr_flags(lr, lr_scheduler, warmup), "--rank", str(rank), "--checkpointing_steps", str(save_every),
            "--seed", str(seed),
            "--mixed_precision", "no", "--dataloader_num_workers", "0"]
    if class_prompt is not None:
        cdir = Path(class_dir).resolve() if class_dir is not None else out / "class_images"
        args += ["--with_prior_preservation", "--prior_loss_weight", "1.0", "--class_prompt", class_prompt,
                 "--class_data_dir", str(cdir), "--num_class_images", str(num_class_images)]
    if conceptor_flags:
        args += ["--adam_weight_decay", "0.0", "--max_grad_norm", "inf"]
    _run("train_dreambooth_lora", args + list(extra), out, scripts)
    saved = [(int(d.name.rsplit("-", 1)[1]), d / "pytorch_lora_weights.safetensors")
             for d in out.glob("checkpoint-*") if (d / "pytorch_lora_weights.safetensors").is_file()]
    return _with_final(saved, steps, out / "pytorch_lora_weights.safetensors")


def read_scalars(out: Path) -> dict[str, list[tuple[int, float, float]]]:
    """The scalars a run logged to tensorboard (the scripts' default --report_to): {"loss": [(step, value,
    wall_time)], "lr": ...}. The scripts log every step (loss of that step's batch); needs tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result: dict[str, list[tuple[int, float, float]]] = {}
    for events in sorted(Path(out).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            result.setdefault(tag, []).extend((e.step, e.value, e.wall_time) for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in result.items()}


def _smoke(work: Path) -> None:
    from benchmarks.dataset_quality import render_concept
    from conceptor import api

    model = str(Path(__file__).resolve().parents[1] / "conceptor" / "toyworld" / "model")
    images = render_concept(work / "arrow", "arrow", "red")
    common = dict(steps=4, seed=0, batch_size=1, resolution=64, save_every=2, scripts=work / "scripts", overwrite=True)

    t0 = time.perf_counter()
    ti = run_textual_inversion(model, images, work / "ti", token="<arrow>", init_token="object", lr=5e-4, **common)
    print("textual_inversion:", [(s, str(p)) for s, p in ti], f"({time.perf_counter() - t0:.1f} s)")
    print("  loss:", [(s, round(v, 4)) for s, v, _ in read_scalars(work / "ti").get("loss", [])])
    t0 = time.perf_counter()
    db = run_dreambooth_lora(model, images, work / "db", instance_prompt="a photo of sks object",
                             class_prompt="a photo of object", class_dir=work / "class_images", num_class_images=4,
                             lr=1e-4, rank=4, **common)
    print("dreambooth_lora:", [(s, str(p)) for s, p in db], f"({time.perf_counter() - t0:.1f} s)")
    print("  loss:", [(s, round(v, 4)) for s, v, _ in read_scalars(work / "db").get("loss", [])])

    from safetensors.torch import load_file

    for s, p in ti:
        print(f"  TI step {s}: {({k: tuple(v.shape) for k, v in load_file(p).items()})}")
    m = api.load(model)
    tok = m.add_embedding(ti[-1][1])
    img = m.generate(f"a photo of {tok} object", steps=2)
    print("conceptor loads the TI file: token", tok, "->", type(img[0]).__name__, img[0].size)
    m = api.load(model, loras=[db[-1][1]])
    img = m.generate("a photo of sks object", steps=2)
    print("conceptor loads the LoRA:", db[-1][1].name, "->", type(img[0]).__name__, img[0].size)
    m = api.load(model, loras=[db[0][1]])
    print("  and the checkpoint LoRA of step", db[0][0], "->", m.generate("a photo of sks object", steps=2)[0].size)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    _smoke(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/diffusers_scripts_smoke"))

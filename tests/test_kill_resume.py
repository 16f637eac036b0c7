"""Kill -9 a training run at random moments, resume with --resume latest until it finishes: the result is
bit-identical to a run that was never interrupted (TI, DreamBooth LoRA with class-image generation, and
fine-tuning with cache building)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

STEPS = 10


def _args(method, tiny, data, out):
    common = ["--model", str(tiny), "--steps", str(STEPS), "--checkpoint-every", "2", "--log-every", "1",
              "--output", str(out), "--seed", "3"]
    if method == "ti":
        return ["train", "textual-inversion", "--images", str(data), "--token", "<t>", "--init-token", "toy",
                "--lr", "5e-2", *common]
    if method == "lora":
        return ["train", "dreambooth", "--images", str(data), "--instance-prompt", "a photo of sks toy",
                "--class-prompt", "a photo of a toy", "--num-class-images", "3", "--class-sampling-steps", "3",
                "--lora", "--rank", "2", "--lr", "1e-2", *common]
    return ["train", "finetune", "--dataset", str(data), "--cache-dir", str(out.parent / f"{out.name}-cache"),
            "--lr", "1e-3", "--batch-size", "2", *common]


def _result(method, out):
    name = {"ti": "learned_embeds.safetensors", "lora": "pytorch_lora_weights.safetensors",
            "finetune": "unet/diffusion_pytorch_model.safetensors"}[method]
    return load_file(str(out / name))


@pytest.mark.parametrize("method", ["ti", "lora", "finetune"])
def test_sigkill_then_resume_equals_uninterrupted(method, tiny_sd1, concept_images, tmp_path):
    data = concept_images
    if method == "finetune":
        rows = ["image_path,caption"] + [f"{p.name},a picture of a round thing {i}"
                                         for i, p in enumerate(sorted(concept_images.glob("*.png")))]
        (concept_images / "data.csv").write_text("\n".join(rows) + "\n")
        data = concept_images / "data.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "conceptor"]
    clean = subprocess.run(cmd + _args(method, tiny_sd1, data, tmp_path / "clean"), env=env, capture_output=True,
                           text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]

    out = tmp_path / "killed"
    rng = random.Random(method)
    kills = 0
    args = _args(method, tiny_sd1, data, out)
    for attempt in range(12):
        resume = ["--resume", "latest"] if attempt else []
        proc = subprocess.Popen(cmd + args + resume, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt < 3:  # three kills at random moments (imports, caching/class images, steps, checkpoints)
            time.sleep(rng.uniform(2.5, 6.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                proc.wait()
                continue
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            break
        _, err = proc.communicate()
        assert proc.returncode == 0, err.decode()[-2000:]
        break
    assert kills >= 1
    a, b = _result(method, tmp_path / "clean"), _result(method, out)
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "resumed result differs from the uninterrupted run"


def test_a_run_stopped_while_making_class_images_resumes(tiny_sd1, concept_images, tmp_path, cli, monkeypatch):
    """Class images are written into the run folder during setup, before the first step: a run stopped there
    (killed, or cancelled from the page) must leave a folder that --resume latest accepts as its own."""
    from conceptor.methods import dreambooth

    real = dreambooth.ensure_class_images

    def stopped(components, folder, *args, **kwargs):
        real(components, folder, args[0], 1, **kwargs)  # one image written, then the process is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(dreambooth, "ensure_class_images", stopped)
    out = tmp_path / "run"
    args = _args("lora", tiny_sd1, concept_images, out)
    code, _, err = cli(*args)
    assert code == 130 and (out / "class_images").is_dir() and not (out / "config.yaml").exists()
    monkeypatch.setattr(dreambooth, "ensure_class_images", real)
    code, _, err = cli(*args, "--resume", "latest")
    assert code == 0, err
    assert (out / "pytorch_lora_weights.safetensors").is_file() and len(list((out / "class_images").iterdir())) == 3


def test_a_run_killed_while_writing_its_manifest_resumes(tiny_sd1, concept_images, tmp_path, cli):
    """A SIGKILL inside the first atomic write leaves the manifest's temp file (and the lock) only."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".conceptor.lock").write_text('{"pid": 999999999}')
    (out / "..conceptor-run.json.k1ll3d.tmp").write_text('{"form')  # atomic_path's f".{name}.XXXX.tmp"
    code, _, err = cli(*_args("ti", tiny_sd1, concept_images, out), "--resume", "latest")
    assert code == 0, err
    assert (out / "learned_embeds.safetensors").is_file()

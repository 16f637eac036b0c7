"""Fine-tuning: dataset sources and bad rows, buckets, the on-disk cache, outputs, and 2-process training."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from conceptor import api
from conceptor.config import build_config
from conceptor.data.buckets import fit, make_buckets, nearest_bucket
from conceptor.data.captions import load_examples
from conceptor.errors import ConceptorError
from conceptor.models.load import load_components


def _img(path, size, color):
    im = Image.new("RGB", size, (30, 30, 30))
    ImageDraw.Draw(im).ellipse([4, 4, size[0] - 4, size[1] - 4], fill=color)
    im.save(path)


@pytest.fixture()
def csv_dataset(tmp_path):
    root = tmp_path / "pokemon"
    (root / "images").mkdir(parents=True)
    rows = ["image_path,caption"]
    sizes = [(48, 32), (32, 48), (40, 40), (64, 32), (32, 32), (48, 36)]
    for i, size in enumerate(sizes):
        _img(root / "images" / f"{i}.png", size, (200, 40 * i, 60))
        rows.append(f"images/{i}.png,a drawing of a round creature number {i}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root / "data.csv"


def ft_config(dataset, output, cache, **kw):
    ft = {"dataset": str(dataset), "cache_dir": str(cache), **kw.pop("ft", {})}
    return build_config("finetune", None, {
        "model": {"model": str(kw.pop("model"))}, "optim": {"lr": 1e-3},
        "train": {"output": str(output), "steps": kw.pop("steps", 3), "batch_size": kw.pop("batch_size", 2),
                  "log_every": 1, "checkpoint_every": 0, **kw},
        "finetune": ft})


def test_sources_and_bad_rows(tmp_path, csv_dataset):
    ex = load_examples(str(csv_dataset))
    assert len(ex) == 6 and ex[0].caption.endswith("number 0") and ex[0].path.is_file()
    # imagefolder + metadata.jsonl, and sidecar .txt captions
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    lines = []
    for i in range(3):
        _img(folder / f"{i}.png", (32, 32), (10, 200, 10))
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"green {i}"}))
        (folder / f"{i}.txt").write_text(f"sidecar {i}")
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    assert [e.caption for e in load_examples(str(folder))] == ["green 0", "green 1", "green 2"]
    (folder / "metadata.jsonl").unlink()
    assert [e.caption for e in load_examples(str(folder))] == ["sidecar 0", "sidecar 1", "sidecar 2"]
    # bad rows: named, and either stop the run or are skipped with a count
    with open(csv_dataset, "a") as f:
        f.write("images/missing.png,a ghost\nimages/0.png,\n")
    (csv_dataset.parent / "images" / "1.png").write_bytes(b"not a png")
    with pytest.raises(ConceptorError, match=r"3 bad example\(s\).*row 3 of data.csv"):
        load_examples(str(csv_dataset))
    assert len(load_examples(str(csv_dataset), skip_bad=True)) == 5
    with pytest.raises(ConceptorError, match="no column"):
        load_examples(str(csv_dataset), caption_column="text")


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    _img(tmp_path / "a.png", (32, 32), (255, 0, 0))
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "a.png")], "text": ["a red disc"]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    ex = load_examples(str(tmp_path / "saved"))
    assert len(ex) == 1 and ex[0].caption == "a red disc" and ex[0].image().size == (32, 32)


def test_buckets_keep_aspect():
    buckets = make_buckets(512, 256, 1024, 64)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert nearest_bucket((1024, 512), buckets)[0] > nearest_bucket((1024, 512), buckets)[1]
    assert nearest_bucket((300, 300), buckets) == (512, 512)
    im, _ = fit(Image.new("RGB", (1000, 500)), (704, 320))
    assert im.size == (704, 320)


def test_finetune_buckets_cache_and_outputs(tiny_sd1, csv_dataset, tmp_path, caplog):
    from diffusers import StableDiffusionPipeline

    cache = tmp_path / "cache"
    original = load_components(str(tiny_sd1))
    result = api.train(ft_config(csv_dataset, tmp_path / "run", cache, model=tiny_sd1,
                                 ft={"buckets": True, "caption_dropout": 0.2, "save_single_file": True}))
    pipe = StableDiffusionPipeline.from_pretrained(str(result.output), safety_checker=None)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), original.unet.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.parameters(), original.vae.parameters()))
    assert (result.output / "model.safetensors").is_file()
    assert list(cache.rglob("*.safetensors"))
    # A second run over the same data encodes nothing; a changed caption is a miss for that caption only.
    caplog.clear()
    with caplog.at_level("INFO", logger="conceptor"):
        api.train(ft_config(csv_dataset, tmp_path / "run2", cache, model=tiny_sd1, ft={"buckets": True}))
    assert "latents: 6 from cache, 0 encoded" in caplog.text
    text = csv_dataset.read_text().replace("number 3", "number three")
    csv_dataset.write_text(text)
    from conceptor.data.cache import TensorCache

    before = len(list(cache.rglob("*.safetensors")))
    api.train(ft_config(csv_dataset, tmp_path / "run3", cache, model=tiny_sd1, ft={"buckets": True}))
    assert len(list(cache.rglob("*.safetensors"))) == before + 1
    assert TensorCache  # imported for the reader: the cache is content-keyed safetensors files


def test_finetune_lora_and_epochs(tiny_sd1, csv_dataset, tmp_path):
    cfg = ft_config(csv_dataset, tmp_path / "run", "none", model=tiny_sd1, epochs=2,
                    ft={"lora": True, "rank": 2})
    result = api.train(cfg)
    assert (result.output / "pytorch_lora_weights.safetensors").is_file()
    assert result.step == 6  # 6 examples, batch 2, no buckets: 3 steps per epoch
    saved = (result.output / "config.yaml").read_text()
    assert "steps: 6" in saved


def test_two_processes_equal_one_with_the_global_batch(tiny_sd1, csv_dataset, tmp_path):
    """gloo on the CPU: 2 processes x batch 1 train exactly what 1 process x batch 2 does; one output.

    Adam with a large epsilon is a plain gradient step, so weights differ only by float summation order
    (Adam's sign-like first steps would amplify that order into lr-sized differences on ~zero gradients).
    """
    (tmp_path / "sgd.yaml").write_text("optim:\n  adam_epsilon: 1.0\n")
    common = ["train", "finetune", "--model", str(tiny_sd1), "--dataset", str(csv_dataset), "--steps", "3",
              "--lr", "1e-2", "--cache-dir", "none", "--checkpoint-every", "0", "--log-every", "1",
              "--config", str(tmp_path / "sgd.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, "-m", "conceptor", *common, "--batch-size", "2", "--output",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "conceptor", *common, "--batch-size", "1", "--output",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "effective batch 2 (batch 1 x accumulation 1 x 2 process(es))" in two.stderr
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = max((a[k] - base[k]).abs().max().item() for k in a)
    assert moved > 1e-4  # it trained
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3 * moved
    rows = [r for r in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert len(rows) == 3  # one writer


def test_ema_output_is_the_decayed_average(tiny_sd1, csv_dataset, tmp_path):
    """Two steps with --ema: diffusers' warm-up gives decay 0 at the first update (average = weights) and
    min(decay, 2/11) at the second, so the saved UNet is exactly 2/11 * raw_1 + 9/11 * raw_2; OUTPUT/raw
    holds raw_2 and the step-1 checkpoint raw_1."""
    from safetensors.torch import load_file

    result = api.train(ft_config(csv_dataset, tmp_path / "run", "none", model=tiny_sd1, steps=2, ema=True,
                                 ema_decay=0.999, checkpoint_every=1))
    name = "unet/diffusion_pytorch_model.safetensors"
    ema, raw2 = load_file(str(result.output / name)), load_file(str(result.output / "raw" / name))
    raw1 = load_file(str(result.output / "checkpoints" / "step-000001" / "trained.safetensors"))
    assert any(not torch.equal(raw1["unet." + k], raw2[k]) for k in raw2)
    for k in raw2:
        assert torch.allclose(ema[k], 2 / 11 * raw1["unet." + k] + 9 / 11 * raw2[k], atol=1e-6), k


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_finetune_lora_on_flow_models_with_buckets(request, csv_dataset, tmp_path, family):
    """The captioned-dataset method on SD3/Flux: captions (T5 and CLIP) cached, aspect buckets whose latents
    Flux can pack (sides of 16 px), the transformer's LoRA in diffusers' layout."""
    from conceptor.formats.lora import read_lora

    model = request.getfixturevalue(f"tiny_{family}")
    cfg = ft_config(csv_dataset, tmp_path / "run", tmp_path / "cache", model=model, steps=3,
                    ft={"lora": True, "rank": 2, "buckets": True})
    result = api.train(cfg)
    lora = read_lora(result.output / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert any(up.abs().sum() > 0 for _, up in lora.values())

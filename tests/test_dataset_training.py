"""Every method trains from a kohya dataset config: subsets with their own captions and tokens, repeats in the
epoch mix, regularisation subsets, aspect buckets, masks that weight the loss; bad datasets stop in one line."""
from __future__ import annotations

import random

import pytest
import torch
from PIL import Image, ImageDraw

from conceptor import api
from conceptor.config import build_config
from conceptor.data.dataset import caption_rng, read_training_set, realise, shorthand, tags
from conceptor.data.dataset_config import read_dataset_config
from conceptor.errors import ConceptorError
from conceptor.training import diffusion as D


def _draw(path, i, size=(64, 64), color=(245, 205, 30)):
    im = Image.new("RGB", size, (40, 70, 200))
    ImageDraw.Draw(im).ellipse([8 + 2 * i, 10, size[0] - 12, size[1] - 10 - i], fill=color)
    im.save(path)


def _folder(root, name, n=3, size=(64, 64), captions=None, masks=False, color=(245, 205, 30)):
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(n):
        _draw(folder / f"{i}.png", i, size, color)
        if captions is not None:
            (folder / f"{i}.txt").write_text(captions[i % len(captions)])
        if masks:
            m = Image.new("L", size, 0)
            ImageDraw.Draw(m).rectangle([size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4], fill=255)
            m.save(folder / f"{i}_mask.png")
    return folder


def _toml(root, text):
    path = root / "dataset.toml"
    path.write_text(text)
    return path


def _config(method, model, dataset, output, section, steps=3, **data):
    return build_config(method, None, {
        "model": {"model": str(model)}, "data": {"dataset": str(dataset), **data}, "optim": {"lr": 1e-3},
        "train": {"output": str(output), "steps": steps, "batch_size": 2, "log_every": 1, "checkpoint_every": 0},
        method.replace("-", "_"): section})


# -- captions, kohya's way -------------------------------------------------------------------------------

def _subset(**kw):
    return shorthand("t", image_dir=None, **{k: v for k, v in kw.items() if k in ("caption_dropout",)}).subsets[0] \
        .__class__(**{**shorthand("t").subsets[0].__dict__, **kw})


def test_caption_options_follow_kohya():
    sub = _subset(shuffle_caption=True, keep_tokens=2, caption_prefix="masterpiece,", caption_suffix=", best")
    caption = "sks dog, sitting, grass, sun, tree"
    seen = set()
    for k in range(40):
        out = realise(caption, sub, random.Random(k))
        parts = tags(out)
        assert parts[:2] == ["masterpiece", "sks dog"]  # the prefix counts as a tag; keep_tokens stay in front
        assert sorted(parts) == sorted(tags("masterpiece, " + caption + ", best"))
        seen.add(out)
    assert len(seen) > 5  # the rest really is shuffled
    dropped = _subset(caption_tag_dropout_rate=0.5, keep_tokens=1)
    lengths = {len(tags(realise(caption, dropped, random.Random(k)))) for k in range(40)}
    assert min(lengths) >= 1 and len(lengths) > 2
    assert all(realise(caption, dropped, random.Random(k)).startswith("sks dog") for k in range(40))
    assert realise(caption, _subset(caption_dropout_rate=1.0), random.Random(0)) == ""
    assert realise(caption, _subset(), random.Random(0)) == caption  # no options: the caption as written
    assert caption_rng(1, 5, 0).random() == caption_rng(1, 5, 0).random() != caption_rng(1, 5, 1).random()


def test_masked_mean_counts_only_the_mask():
    pred, target = torch.zeros(2, 4, 4, 4), torch.ones(2, 4, 4, 4)
    target[:, :, :2] = 3.0  # error 9 in the top half, 1 in the bottom
    weight = torch.zeros(2, 1, 4, 4)
    weight[:, :, 2:] = 1.0
    assert torch.allclose(D.mse_per_sample(pred, target, weight), torch.ones(2))
    assert torch.allclose(D.mse_per_sample(pred, target), torch.full((2,), 5.0))
    half = weight + 0.5 * (1 - weight)  # --mask-weight 0.5
    assert torch.allclose(D.mse_per_sample(pred, target, half), torch.full((2,), (9 * 0.5 + 1) / 1.5))


# -- the training set --------------------------------------------------------------------------------------

def test_repeats_roles_masks_and_buckets_from_one_file(tmp_path):
    a = _folder(tmp_path, "a", 2, captions=["sks object, red"], masks=True)
    b = _folder(tmp_path, "b", 3, size=(96, 48))
    reg = _folder(tmp_path, "reg", 4)
    path = _toml(tmp_path, f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
enable_bucket = true
bucket_reso_steps = 16
min_bucket_reso = 32
max_bucket_reso = 128
  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = 3
  masks = true
  [[datasets.subsets]]
  image_dir = "{b}"
  class_tokens = "zwx object"
  [[datasets.subsets]]
  image_dir = "{reg}"
  class_tokens = "object"
  is_reg = true
""")
    ts = read_training_set(path)
    assert [len(ts.indices(False)), len(ts.indices(True))] == [5, 4]
    entries = ts.entries(False)
    assert sorted(entries) == sorted([0, 1] * 3 + [2, 3, 4])  # a's images 3 times each, b's once
    assert ts.entries(True) == [5, 6, 7, 8]
    assert all(it.mask is not None for it in ts.items[:2]) and all(it.mask is None for it in ts.items[2:])
    ts.assign_sizes(64, 8)
    assert {it.size for it in ts.items[:2]} == {(64, 64)} and ts.items[2].size[0] > ts.items[2].size[1]
    assert ts.pixels(2).shape[1:] == (ts.items[2].size[1], ts.items[2].size[0])
    m = ts.mask(0)
    assert m.shape == (1, 64, 64) and 0.2 < float(m.mean()) < 0.3  # the centre quarter is the concept


def test_bad_datasets_name_the_file_and_subset(tmp_path):
    img = _folder(tmp_path, "img", 2, masks=True)
    Image.new("L", (32, 32), 255).save(img / "1_mask.png")  # wrong size
    path = _toml(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{img}"\nmasks = true\n')
    with pytest.raises(ConceptorError, match=r"dataset.toml: datasets\[0\].subsets\[0\].*1_mask.png is 32x32"):
        read_training_set(path)
    missing = _toml(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "nowhere"\n')
    with pytest.raises(ConceptorError, match=r"dataset.toml: datasets\[0\].subsets\[0\]: image_dir nowhere does not"):
        read_dataset_config(missing)
    (tmp_path / "d.csv").write_text("image_path,caption\nimg/0.png,a photo\n")
    csv = _toml(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nsource = "{tmp_path / "d.csv"}"\n'
                          'caption_column = "text"\n')
    with pytest.raises(ConceptorError, match=r"subsets\[0\].*no column\(s\) text"):
        read_training_set(csv)


# -- every method --------------------------------------------------------------------------------------------

def test_dreambooth_two_concepts_and_a_regularisation_subset(tiny_sd1, tmp_path, monkeypatch):
    from conceptor.methods import dreambooth

    a = _folder(tmp_path, "a", 2)
    b = _folder(tmp_path, "b", 2, color=(200, 30, 30))
    reg = _folder(tmp_path, "reg", 3, color=(30, 200, 30))
    path = _toml(tmp_path, f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{a}"
  class_tokens = "sks object"
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = "{b}"
  class_tokens = "zwx object"
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = "{reg}"
  class_tokens = "an object"
  is_reg = true
""")
    seen = []
    real = dreambooth.DreamBooth._captions
    monkeypatch.setattr(dreambooth.DreamBooth, "_captions",  # training steps only (-1: the validation loss's)
                        lambda self, idx, micro, *a, **k: (micro >= 0 and seen.extend(real(self, idx, micro, *a, **k)))
                        or real(self, idx, micro, *a, **k))
    result = api.train(_config("dreambooth", tiny_sd1, path, tmp_path / "run",
                               {"lora": True, "rank": 2}, steps=6))
    assert (result.output / "pytorch_lora_weights.safetensors").is_file()
    assert {"sks object", "zwx object", "an object"} <= set(seen)  # both concepts and the prior, each its caption
    assert seen.count("an object") * 2 == len(seen)  # one class row per instance row


def test_textual_inversion_two_tokens_with_buckets_and_masks(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    a = _folder(tmp_path, "a", 2, size=(96, 64), masks=True)
    b = _folder(tmp_path, "b", 2, color=(200, 30, 30))
    path = _toml(tmp_path, f"""
[general]
enable_bucket = true
bucket_reso_steps = 8
min_bucket_reso = 16
max_bucket_reso = 64
resolution = 32
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{a}"
  token = "<a-toy>"
  init_token = "toy"
  masks = true
  [[datasets.subsets]]
  image_dir = "{b}"
  token = "<b-toy>"
  init_token = "dog"
""")
    cfg = _config("textual-inversion", tiny_sd1, path, tmp_path / "run", {"vectors": 2}, steps=4)
    result = api.train(cfg)
    files = {p.name for p in result.files}
    assert {"learned_embeds-a-toy.safetensors", "learned_embeds-b-toy.safetensors"} <= files
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1), safety_checker=None)
    before = len(pipe.tokenizer)
    for name, token in (("a-toy", "<a-toy>"), ("b-toy", "<b-toy>")):
        pipe.load_textual_inversion(str(result.output / f"learned_embeds-{name}.safetensors"))
        assert token in pipe.tokenizer.get_vocab()
    assert len(pipe.tokenizer) == before + 4  # two tokens x two vectors


def test_finetune_reads_a_dataset_config_with_kohya_metadata(tiny_sd1, tmp_path):
    import json

    img = _folder(tmp_path, "img", 3)
    (tmp_path / "meta.json").write_text(json.dumps({f"{i}": {"caption": f"a round thing {i}", "tags": "yellow"}
                                                    for i in range(3)}))
    path = _toml(tmp_path, f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\nimage_dir = "{img}"\n'
                           f'metadata_file = "{tmp_path / "meta.json"}"\nshuffle_caption = true\n')
    ts = read_training_set(path)
    assert sorted(it.caption for it in ts.items) == [f"a round thing {i}, yellow" for i in range(3)]
    result = api.train(_config("finetune", tiny_sd1, path, tmp_path / "run", {"lora": True, "cache_dir": "none"}))
    assert (result.output / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("flags, message", [
    (("--repeats", "3"), "--repeats and --dataset"),
    (("--images", "{img}"), "--images"),
])
def test_flags_that_a_dataset_config_already_sets_are_refused(cli, tiny_sd1, tmp_path, flags, message):
    img = _folder(tmp_path, "img", 2)
    path = _toml(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{img}"\nclass_tokens = "sks"\n')
    code, _, err = cli("train", "dreambooth", "--model", tiny_sd1, "--dataset", path, "--output", tmp_path / "out",
                       *[f.format(img=img) for f in flags])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_problem_in_the_dataset_stops_the_run_and_writes_nothing(cli, tiny_sd1, tmp_path):
    img = _folder(tmp_path, "img", 2, captions=["a photo of a dog"])
    path = _toml(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{img}"\ncaption_extension = ".txt"\n'
                           'class_tokens = "sks dog"\n')
    code, _, err = cli("train", "dreambooth", "--model", tiny_sd1, "--dataset", path, "--output", tmp_path / "out",
                       "--steps", "2")
    assert code == 2 and "sks" in err and "subsets[0]" in err
    assert not (tmp_path / "out").exists()


def test_latent_masks_follow_flips_and_weight_the_rest(tiny_sd1, tmp_path):
    from conceptor.methods.denoise import LatentSet
    from conceptor.models.load import load_components

    img = _folder(tmp_path, "img", 2, masks=True)
    m = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(m).rectangle([0, 0, 31, 63], fill=255)  # the left half only: a flip must move it
    m.save(img / "0_mask.png")
    ts = read_training_set(_toml(tmp_path, f'[[datasets]]\nresolution = 32\n[[datasets.subsets]]\n'
                                           f'image_dir = "{img}"\nmasks = true\n'))
    ts.assign_sizes(32, 8)
    latents = LatentSet(load_components(str(tiny_sd1)), ts, [0, 1], flip=True)
    g = torch.Generator().manual_seed(0)
    x, w = latents.sample([0, 0], torch.tensor([0.0, 1.0]), g, mask_weight=0.25)  # row 0 as is, row 1 mirrored
    assert x.shape == (2, 4, 4, 4) and w.shape == (2, 1, 4, 4)
    # (the resize to 32 px blurs the edge a little)
    assert torch.allclose(w[0, 0, :, :2], torch.ones(4, 2), atol=0.02)
    assert torch.allclose(w[0, 0, :, 2:], torch.full((4, 2), 0.25), atol=0.02)
    assert torch.allclose(w[1], w[0].flip(-1))


@pytest.mark.parametrize("family", ["flux", "sd1"])
def test_masks_from_the_shorthand_flags_on_unet_and_flow_models(cli, request, tmp_path, family):
    """--images DIR --masks: NAME_mask.png sidecars weight the loss on a UNet and on Flux's transformer (whose
    latents are packed 2x2: the weight is applied to the unpacked error)."""
    model = request.getfixturevalue(f"tiny_{family}")
    img = _folder(tmp_path, "img", 2, masks=True)
    code, out, err = cli("train", "dreambooth", "--model", model, "--images", img, "--masks", "--mask-weight", "0.1",
                         "--instance-prompt", "a photo of sks toy", "--lora", "--rank", "2", "--steps", "2",
                         "--batch-size", "2", "--output", tmp_path / "run", "--checkpoint-every", "0")
    assert code == 0, err
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert not any(p.name.endswith("_mask.png") for p in read_training_set_items(img))


def read_training_set_items(folder):
    from conceptor.data.dataset import load_training_set

    ts = load_training_set([shorthand("--images", image_dir=str(folder), masks=True)], "--images")
    assert all(it.mask is not None for it in ts.items)
    return [it.example.path for it in ts.items]  # the masks themselves are not training images

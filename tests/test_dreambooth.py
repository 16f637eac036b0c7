"""DreamBooth full and LoRA on tiny models: what trains, prior preservation's class images, the files and who
loads them (diffusers from_pretrained / load_lora_weights), kohya conversion, generation that combines."""
from __future__ import annotations

import json

import pytest
import torch

from conceptor import api
from conceptor.config import build_config
from conceptor.formats.lora import apply_lora, convert_lora, read_lora, write_lora
from conceptor.models.load import load_components


def db_config(model, images, output, db=None, **train):
    steps = train.pop("steps", 4)
    lr = train.pop("lr", 1e-3)
    return build_config("dreambooth", None, {
        "model": {"model": str(model)},
        "data": {"images": str(images)},
        "optim": {"lr": lr},
        "train": {"output": str(output), "steps": steps, "batch_size": 1, "log_every": 1,
                  "checkpoint_every": 0, **train},
        "dreambooth": {"instance_prompt": "a photo of sks toy", **(db or {})},
    })


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_lora_trains_only_adapters_and_diffusers_loads_the_file(tiny_sd1, concept_images, tmp_path):
    from diffusers import StableDiffusionPipeline

    original = load_components(str(tiny_sd1))
    components = load_components(str(tiny_sd1))
    result = api.train(db_config(tiny_sd1, concept_images, tmp_path / "run", {"lora": True, "rank": 2, "alpha": 4.0,
                                                                                "lora_text_encoder": True}),
                       components)
    lora_file = result.output / "pytorch_lora_weights.safetensors"
    assert lora_file in result.files
    # Base weights of the UNet, text encoder and VAE untouched; only adapters exist and moved.
    for name in ("unet", "text_encoder", "vae"):
        trained = dict(getattr(components, name).named_parameters())
        for key, p in getattr(original, name).named_parameters():
            match = [k for k in trained if k.replace(".base_layer", "") == key]
            assert match and torch.equal(trained[match[0]], p), f"{name}.{key} changed"
    lora = read_lora(lora_file)
    assert any(k.startswith("unet.") for k in lora) and any(k.startswith("text_encoder.") for k in lora)
    assert all(d.shape[0] == 2 for d, _ in lora.values())
    assert max(float(u.abs().max()) for _, u in lora.values()) > 0  # B started at zero and trained

    # Our merge of the file == diffusers' own loader of the file == the trained PEFT model itself.
    ids = components.tokenizer(["a photo of sks toy"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        components.unet.eval(), components.text_encoder.eval()
        want = components.unet(x, t, components.text_encoder(ids)[0]).sample
        merged = load_components(str(tiny_sd1))
        apply_lora(lora, merged.unet, merged.text_encoder)
        ours = merged.unet(x, t, merged.text_encoder(ids)[0]).sample
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1), safety_checker=None)
        pipe.load_lora_weights(str(result.output))
        theirs = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
    assert (want - original.unet(x, t, original.text_encoder(ids)[0]).sample).abs().max() > 1e-5
    assert torch.allclose(ours, want, atol=1e-5)
    assert torch.allclose(theirs, want, atol=1e-5)


@pytest.mark.parametrize("targets", ["attn", "attn-ff"])
def test_kohya_round_trip_and_diffusers_reads_kohya(tiny_sd1, concept_images, tmp_path, cli, targets):
    from diffusers import StableDiffusionPipeline

    api.train(db_config(tiny_sd1, concept_images, tmp_path / "run", {"lora": True, "rank": 2, "alpha": 1.0,
                                                                       "lora_targets": targets}))
    src = tmp_path / "run" / "pytorch_lora_weights.safetensors"
    code, out, err = cli("convert", "lora", src, tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 0, err
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "k.safetensors"))
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") and k.endswith(".lora_down.weight") for k in keys)
    # attn-ff adds exactly the feed-forward layers of every transformer block; attn has none of them.
    ff = {k for k in keys if "_ff_net_" in k and k.endswith(".lora_down.weight")}
    attn = {k for k in keys if "_attn1_to_q" in k and k.endswith(".lora_down.weight")}
    assert len(ff) == (2 * len(attn) if targets == "attn-ff" else 0)
    assert all(keys[k].ndim == 0 for k in keys if k.endswith(".alpha"))
    back = convert_lora(tmp_path / "k.safetensors", tmp_path / "d.safetensors", "diffusers")
    a, b = read_lora(src), read_lora(back)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k][0], b[k][0]) and torch.allclose(a[k][1], b[k][1]) for k in a)

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1), safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "k.safetensors"))  # diffusers' kohya reader takes our file
    mine = load_components(str(tiny_sd1))
    apply_lora(a, mine.unet, mine.text_encoder)
    x, t = torch.randn(1, 4, 4, 4), torch.tensor([300])
    h = torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, t, h).sample, mine.unet(x, t, h).sample, atol=1e-5)


def test_full_dreambooth_with_prior_preservation(tiny_sd1, concept_images, tmp_path):
    from diffusers import StableDiffusionPipeline

    original = load_components(str(tiny_sd1))
    components = load_components(str(tiny_sd1))
    class_dir = tmp_path / "class"
    cfg = db_config(tiny_sd1, concept_images, tmp_path / "run",
                    {"class_prompt": "a photo of a toy", "class_images": str(class_dir), "num_class_images": 3,
                     "class_sampling_steps": 2, "save_single_file": True}, ema=True, ema_decay=0.5)
    result = api.train(cfg, components)
    made = sorted(p.name for p in class_dir.iterdir())
    assert made == ["class-00000.png", "class-00001.png", "class-00002.png"]
    # The run folder is a pipeline diffusers loads; its UNet is the trained (EMA) one, VAE/text encoder as before.
    pipe = StableDiffusionPipeline.from_pretrained(str(result.output), safety_checker=None)
    unet_changed = any(not torch.equal(p, original_p) for p, original_p in
                       zip(pipe.unet.parameters(), original.unet.parameters()))
    assert unet_changed
    for a, b in zip(pipe.vae.parameters(), original.vae.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(pipe.text_encoder.parameters(), original.text_encoder.parameters()):
        assert torch.equal(a, b)
    raw = StableDiffusionPipeline.from_pretrained(str(result.output / "raw"), safety_checker=None)
    assert any(not torch.equal(a, b) for a, b in zip(raw.unet.parameters(), pipe.unet.parameters()))
    assert json.loads((result.output / "scheduler" / "scheduler_config.json").read_text()) == \
        json.loads((tiny_sd1 / "scheduler" / "scheduler_config.json").read_text())
    assert (result.output / "model.yaml").is_file()  # the LDM config A1111 reads beside the checkpoint
    single = load_components(str(result.output / "model.safetensors"), model_config=str(tiny_sd1))
    for a, b in zip(single.unet.parameters(), pipe.unet.parameters()):
        assert torch.equal(a, b)

    # A second run reuses the class images instead of generating them again.
    stamps = {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()}
    api.train(db_config(tiny_sd1, concept_images, tmp_path / "run2",
                        {"class_prompt": "a photo of a toy", "class_images": str(class_dir), "num_class_images": 3}))
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()} == stamps


def test_lora_resume_equals_uninterrupted(tiny_sd1, concept_images, tmp_path):
    lora = {"lora": True, "rank": 2, "class_prompt": "a toy", "num_class_images": 2, "class_sampling_steps": 1}
    api.train(db_config(tiny_sd1, concept_images, tmp_path / "a", lora, steps=6))
    api.train(db_config(tiny_sd1, concept_images, tmp_path / "b", lora, steps=3, checkpoint_every=3))
    api.train(db_config(tiny_sd1, concept_images, tmp_path / "b", lora, steps=6, resume="latest"))
    a = read_lora(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = read_lora(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k][1], b[k][1]) for k in a)


def _pixels(path) -> bytes:
    from PIL import Image

    return Image.open(path).tobytes()


def test_generate_combines_lora_and_embedding(tiny_sd1, concept_images, tmp_path, cli):
    api.train(db_config(tiny_sd1, concept_images, tmp_path / "db", {"lora": True, "rank": 2}, lr=5e-2))
    code, _, err = cli("train", "textual-inversion", "--model", tiny_sd1, "--images", concept_images,
                       "--token", "<grooty>", "--init-token", "toy", "--steps", "2", "--output", tmp_path / "ti")
    assert code == 0, err
    outs = {}
    for scale in ("0", "1"):
        code, _, err = cli("generate", "--model", tiny_sd1, "--lora", f"{tmp_path / 'db'}:{scale}",
                           "--embedding", tmp_path / "ti", "--prompt", "a photo of <grooty> sks toy", "--steps", "2",
                           "--output", tmp_path / f"img{scale}")
        assert code == 0, err
        outs[scale] = _pixels(tmp_path / f"img{scale}" / "000-seed0.png")  # (the PNG's settings chunk differs)
    code, _, err = cli("generate", "--model", tiny_sd1, "--embedding", tmp_path / "ti", "--prompt",
                       "a photo of <grooty> sks toy", "--steps", "2", "--output", tmp_path / "plain")
    assert _pixels(tmp_path / "plain" / "000-seed0.png") == outs["0"]  # scale 0 = no LoRA
    assert outs["1"] != outs["0"]


def test_bad_lora_inputs(tiny_sd1, tmp_path, cli):
    code, _, err = cli("generate", "--model", tiny_sd1, "--lora", tmp_path / "missing.safetensors", "--prompt", "x")
    assert code == 2 and "does not exist" in err
    other = {"unet.down_blocks.9.nothing.to_q": (torch.zeros(2, 8), torch.zeros(8, 2))}
    write_lora(other, tmp_path / "other.safetensors")
    code, _, err = cli("generate", "--model", tiny_sd1, "--lora", tmp_path / "other.safetensors", "--prompt", "x")
    assert code == 2 and "does not fit this model" in err
    code, _, err = cli("train", "dreambooth", "--model", tiny_sd1, "--images", tmp_path, "--output", tmp_path / "o")
    assert code == 2 and "--instance-prompt is required" in err
    code, _, err = cli("train", "dreambooth", "--model", tiny_sd1, "--instance-prompt", "sks", "--images", tmp_path,
                       "--lora", "--train-text-encoder")
    assert code == 2 and "--lora-text-encoder" in err
    # (an output inside --images is refused first since issue 17, so the images are a folder of their own)
    code, _, err = cli("train", "dreambooth", "--model", tiny_sd1, "--instance-prompt", "sks", "--images",
                       tmp_path / "images", "--use-8bit-adam", "--output", tmp_path / "o8")
    assert code == 2 and ("bitsandbytes" in err or "GPU" in err)


@pytest.mark.parametrize("to", ["kohya", "nonsense"])
def test_convert_lora_cli_errors(tmp_path, cli, to):
    code, _, err = cli("convert", "lora", tmp_path / "nope.safetensors", tmp_path / "o.safetensors", "--to", to)
    assert code == 2 and err.startswith("error:") or "invalid choice" in err


def test_eval_measures_dreambooth_runs(tiny_sd1, concept_images, tmp_path, cli):
    from conceptor.eval.run import subject_of

    assert subject_of("a photo of a sks toy") == "sks toy" and subject_of("sks dog") == "sks dog"
    api.train(db_config(tiny_sd1, concept_images, tmp_path / "run", {"lora": True, "rank": 2,
                                                                      "class_prompt": "a photo of a toy",
                                                                      "num_class_images": 1,
                                                                      "class_sampling_steps": 1}))
    code, out, err = cli("eval", tmp_path / "run", "--num-images", "4", "--steps", "2")
    assert code == 0, err
    scores = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert scores["method"] == "dreambooth" and scores["subject"] == "sks toy"
    assert 0 <= scores["class_prior_retention"] <= 1 and 0 <= scores["fidelity"] <= 1
    assert (tmp_path / "run" / "eval-class.png").is_file()


def test_prior_loss_is_weighted_class_term(tiny_sd1, concept_images, tmp_path):
    """loss(w) = instance + w * class on the same micro-batch: the two batches and the weight are real."""
    from conceptor.data.order import step_generator
    from conceptor.methods.dreambooth import DreamBooth

    losses = {}
    for w in (0.0, 1.0, 3.0):
        cfg = db_config(tiny_sd1, concept_images, tmp_path / "run", {
            "class_prompt": "a photo of a toy", "class_images": str(tmp_path / "cls"), "num_class_images": 2,
            "class_sampling_steps": 1, "prior_loss_weight": w})
        c = load_components(str(tiny_sd1)).frozen()
        method = DreamBooth()
        method.setup(c, cfg, torch.device("cpu"))
        assert method.prior is not None and method.prior.n == 2
        with torch.no_grad():
            losses[w] = method.loss(0, step_generator(0, 0)).item()
    class_part = losses[1.0] - losses[0.0]
    assert class_part > 0
    assert losses[3.0] == pytest.approx(losses[0.0] + 3 * class_part, rel=1e-5)


@pytest.mark.parametrize("flags,needle", [
    (["--lora", "--rank", "0"], "--rank must be at least 1"),
    (["--class-images", "CLS"], "--class-images needs --class-prompt"),
    (["--images", "EMPTY"], "no images in"),
])
def test_dreambooth_bad_input(tiny_sd1, concept_images, tmp_path, cli, flags, needle):
    (tmp_path / "empty").mkdir()
    flags = [str(tmp_path / "empty") if f == "EMPTY" else str(tmp_path / "cls") if f == "CLS" else f for f in flags]
    args = ["train", "dreambooth", "--model", tiny_sd1, "--instance-prompt", "a photo of sks toy", "--steps", "1",
            "--output", tmp_path / "o"]
    if "--images" not in flags:
        args += ["--images", concept_images]
    code, _, err = cli(*args, *flags)
    assert code == 2 and needle in err, err

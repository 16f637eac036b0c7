"""Textual inversion end to end on tiny models: what trains, what is saved, who can load it, resume."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conceptor import api
from conceptor.config import build_config
from conceptor.models.load import load_components

TOKEN = "<cat-toy>"


def ti_config(model, images, output, **train):
    steps = train.pop("steps", 12)
    vectors = train.pop("vectors", 1)
    init_token = train.pop("init_token", "toy")
    return build_config("textual-inversion", None, {
        "model": {"model": str(model)},
        "data": {"images": str(images)},
        "optim": {"lr": 5e-2},
        "train": {"output": str(output), "steps": steps, "batch_size": 2, "log_every": 1,
                  "checkpoint_every": 0, **train},
        "textual_inversion": {"token": TOKEN, "init_token": init_token, "vectors": vectors},
    })


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_only_new_rows_train(family, tiny_sd1, tiny_sd2, concept_images, tmp_path):
    model = tiny_sd1 if family == "sd1" else tiny_sd2
    original = load_components(str(model))
    components = load_components(str(model))
    init = original.text_encoder.get_input_embeddings().weight[original.tokenizer.convert_tokens_to_ids("toy</w>")]
    result = api.train(ti_config(model, concept_images, tmp_path / "run", vectors=3), components)

    emb = components.text_encoder.get_input_embeddings()
    # Every original row bit-identical, and the matrix never had a gradient.
    assert torch.equal(emb.base.weight, original.text_encoder.get_input_embeddings().weight)
    assert emb.base.weight.grad is None
    for name, module in (("unet", "unet"), ("vae", "vae"), ("text_encoder", "text_encoder")):
        trained = dict(getattr(components, module).named_parameters())
        for key, p in getattr(original, module).named_parameters():
            key = key.replace("token_embedding.weight", "token_embedding.base.weight")
            assert torch.equal(trained[key], p), f"{name}.{key} changed"
            assert trained[key].grad is None
    # All vectors moved away from the initializer (multi-vector must train every vector).
    saved = load_file(str(result.output / "learned_embeds.safetensors"))
    assert list(saved) == [TOKEN]
    vectors = saved[TOKEN]
    assert vectors.shape == (3, 32) and vectors.dtype == torch.float32
    assert all((vectors[i] - init).abs().max() > 1e-3 for i in range(3))
    rows = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]  # the training loss (the validation loss has rows of its own)
    assert len(rows) == 12 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_cli_outputs_and_diffusers_loads_them(tiny_sd1, concept_images, tmp_path, cli):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    code, stdout, err = cli("train", "textual-inversion", "--model", tiny_sd1, "--images", concept_images,
                            "--token", TOKEN, "--init-token", "toy", "--vectors", "2", "--steps", "6",
                            "--checkpoint-every", "3", "--output", out, "--validation-prompt", f"a photo of {TOKEN}",
                            "--validation-images", "2", "--validation-every", "3", "--log-every", "1")
    assert code == 0, err
    for name in ("learned_embeds.safetensors", "learned_embeds-steps-3.safetensors", "config.yaml", "loss.png",
                 "metrics.jsonl", "samples/step-000000.png", "samples/step-000003.png", "samples/step-000006.png",
                 "checkpoints/step-000003/state.json", "checkpoints/step-000006/optimizer.pt"):
        assert (out / name).is_file(), name
    assert "textual-inversion" in (out / "config.yaml").read_text()

    ours = load_file(str(out / "learned_embeds.safetensors"))[TOKEN]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    pipe.load_textual_inversion(out)  # the folder, as diffusers' docs show
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], ours)

    # conceptor's generate and diffusers' pipeline give the same picture for the same seed.
    model = api.load(str(tiny_sd1), [out])
    mine = model.generate(f"a photo of {TOKEN}", steps=3, seed=7)[0]
    latents = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(7))
    theirs = pipe(f"a photo of {TOKEN}", num_inference_steps=3, latents=latents, guidance_scale=7.5,
                  height=32, width=32, output_type="np").images[0]
    import numpy as np

    assert np.abs(np.asarray(mine, dtype=np.float32) / 255 - theirs).max() < 2 / 255


def test_resume_equals_uninterrupted_run_with_grad_accum(tiny_sd1, concept_images, tmp_path, cli):
    common = ["train", "textual-inversion", "--model", tiny_sd1, "--images", concept_images, "--token", TOKEN,
              "--init-token", "toy", "--vectors", "2", "--batch-size", "2", "--grad-accum", "2",
              "--checkpoint-every", "10", "--log-every", "1", "--lr", "1e-2", "--lr-scheduler", "constant"]
    # constant: a cosine schedule follows --steps, so a 20-step run is not the start of a 30-step one
    assert cli(*common, "--steps", "30", "--output", tmp_path / "a")[0] == 0
    assert cli(*common, "--steps", "20", "--output", tmp_path / "b")[0] == 0
    code, _, err = cli(*common, "--steps", "30", "--output", tmp_path / "b", "--resume", "latest")
    assert code == 0, err
    a = load_file(str(tmp_path / "a" / "learned_embeds.safetensors"))[TOKEN]
    b = load_file(str(tmp_path / "b" / "learned_embeds.safetensors"))[TOKEN]
    assert torch.allclose(a, b, atol=1e-5)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 31))  # resumed at 21, no step logged twice


def test_checkpoints_limit_prunes(tiny_sd1, concept_images, tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli("train", "textual-inversion", "--model", tiny_sd1, "--images", concept_images,
                       "--token", TOKEN, "--init-token", "toy", "--steps", "6", "--checkpoint-every", "2",
                       "--checkpoints-limit", "2", "--output", out)
    assert code == 0, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    assert sorted(p.name for p in out.glob("learned_embeds-steps-*")) == [
        "learned_embeds-steps-4.safetensors", "learned_embeds-steps-6.safetensors"]


def test_config_file_with_flag_override(tiny_sd1, concept_images, tmp_path, cli):
    cfg = tmp_path / "ti.yaml"
    cfg.write_text(f"model:\n  model: {tiny_sd1}\ndata:\n  images: {concept_images}\n"
                   f"train:\n  steps: 50\n  output: {tmp_path / 'run'}\ntextual_inversion:\n"
                   f"  token: '{TOKEN}'\n  init_token: toy\n")
    code, _, err = cli("train", "textual-inversion", "--config", cfg, "--steps", "3")
    assert code == 0, err
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "steps: 3" in saved and "init_token: toy" in saved


def test_bf16_keeps_trainables_fp32(tiny_sd1, concept_images, tmp_path):
    components = load_components(str(tiny_sd1))
    result = api.train(ti_config(tiny_sd1, concept_images, tmp_path / "run", steps=3, mixed_precision="bf16"),
                       components)
    emb = components.text_encoder.get_input_embeddings()
    assert emb.new.dtype == torch.float32 and emb.base.weight.dtype == torch.bfloat16
    assert components.unet.dtype == torch.bfloat16
    assert torch.isfinite(load_file(str(result.output / "learned_embeds.safetensors"))[TOKEN]).all()


def test_channels_last_changes_layout_not_result(tiny_sd1, concept_images, tmp_path):
    """--channels-last is a memory layout: the UNet's convolutions run NHWC and learn the same vectors."""
    runs = {}
    for cl in (False, True):
        components = load_components(str(tiny_sd1))
        result = api.train(ti_config(tiny_sd1, concept_images, tmp_path / f"run-{cl}", steps=4, channels_last=cl),
                           components)
        weight = components.unet.conv_in.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) == cl and weight.dim() == 4
        runs[cl] = load_file(str(result.output / "learned_embeds.safetensors"))[TOKEN]
    base = load_components(str(tiny_sd1))
    init = base.text_encoder.get_input_embeddings().weight[base.tokenizer.convert_tokens_to_ids("toy</w>")]
    assert (runs[True][0] - init).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-4, atol=1e-5)


def test_caption_files_override_templates(tiny_sd1, concept_images, tmp_path):
    from conceptor.methods.textual_inversion import TextualInversion

    (concept_images / "0.txt").write_text("a {} on the beach")
    components = load_components(str(tiny_sd1)).frozen()
    method = TextualInversion()
    method.setup(components, ti_config(tiny_sd1, concept_images, tmp_path / "run"), torch.device("cpu"))
    assert method.captions[0] == ["a {} on the beach"]
    assert len(method.captions[1]) > 20  # the object templates


def _start_vectors(model, images, output, init_token, vectors=2):
    """The new token's vectors right after set-up (before any step), and the frozen input-embedding matrix."""
    from conceptor.methods.textual_inversion import TextualInversion

    components = load_components(str(model)).frozen()
    weight = components.text_encoder.get_input_embeddings().weight.detach().clone()
    method = TextualInversion()
    method.setup(components, ti_config(model, images, output, init_token=init_token, vectors=vectors),
                 torch.device("cpu"))
    return method.vectors(), weight, components.tokenizer


def test_several_init_words_start_at_their_mean(tiny_sd1, concept_images, tmp_path):
    vectors, weight, tokenizer = _start_vectors(tiny_sd1, concept_images, tmp_path / "run", "red toy")
    ids = tokenizer.convert_tokens_to_ids(["red</w>", "toy</w>"])
    mean = weight[ids].float().mean(0)
    assert not torch.allclose(weight[ids[0]], weight[ids[1]])  # a real mean, not one of the rows
    assert vectors.shape == (2, 32)
    for v in vectors:  # --vectors 2: every vector starts at the mean
        torch.testing.assert_close(v, mean, rtol=0, atol=1e-6)


def test_word_split_into_pieces_starts_at_their_mean(tiny_sd1, concept_images, tmp_path):
    vectors, weight, tokenizer = _start_vectors(tiny_sd1, concept_images, tmp_path / "run", "toaster", vectors=1)
    ids = tokenizer.encode("toaster", add_special_tokens=False)
    assert len(ids) > 1  # the tiny vocabulary has no "toaster": it was refused before
    torch.testing.assert_close(vectors[0], weight[ids].float().mean(0), rtol=0, atol=1e-6)


def test_one_token_init_word_is_its_row_exactly(tiny_sd1, concept_images, tmp_path):
    vectors, weight, tokenizer = _start_vectors(tiny_sd1, concept_images, tmp_path / "run", "toy")
    row = weight[tokenizer.convert_tokens_to_ids("toy</w>")].float()
    assert all(torch.equal(v, row) for v in vectors)


@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_init_text_is_one_line_error(blank, cli, tiny_sd1, concept_images, tmp_path):
    code, _, err = cli("train", "textual-inversion", "--model", tiny_sd1, "--images", concept_images,
                       "--token", TOKEN, "--init-token", blank, "--steps", "1", "--output", tmp_path / "run")
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert ("empty" if blank else "--init-token is required") in lines[0], lines[0]

"""Pivotal tuning on tiny models: what trains (the new rows and the LoRA, nothing else), the vectors stopping at
--ti-frac, resume, the three files and who loads them (diffusers' load_lora_weights + load_textual_inversion, the
bundle A1111 reads, conceptor generate --lora RUN), and continuing from an earlier LoRA or embedding."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from conceptor import api
from conceptor.config import build_config
from conceptor.formats.bundle import read_bundle
from conceptor.formats.embeddings import read_embedding
from conceptor.models.load import load_components


def pv_config(model, images, output, pv=None, lora=None, **train):
    return build_config("pivotal", None, {
        "model": {"model": str(model)}, "data": {"images": str(images)},
        "optim": {"lr": train.pop("lr", 1e-3)},
        "train": {"output": str(output), "steps": train.pop("steps", 4), "batch_size": 1, "log_every": 1,
                  "checkpoint_every": train.pop("checkpoint_every", 0), **train},
        "lora": {"rank": 2, **(lora or {})},
        "pivotal": {"token": "<sks>", "init_token": "toy", "vectors": 2, "embedding_lr": 1e-2,
                    "instance_prompt": "a photo of {} toy", **(pv or {})}})


def test_vectors_and_lora_train_and_nothing_else(tiny_sd1, concept_images, tmp_path):
    original = load_components(str(tiny_sd1))
    c = load_components(str(tiny_sd1))
    vocab = len(c.tokenizer)
    result = api.train(pv_config(tiny_sd1, concept_images, tmp_path / "run", {"ti_frac": 1.0}), c)
    assert len(c.tokenizer) == vocab + 2  # <sks>, <sks>_1
    emb = read_embedding(result.output / "learned_embeds.safetensors")
    start = original.text_encoder.get_input_embeddings().weight[original.tokenizer.convert_tokens_to_ids("toy</w>")]
    assert emb.token == "<sks>" and emb.vectors.shape == (2, 32)
    assert not torch.allclose(emb.vectors, start.expand(2, -1))  # the vectors moved
    for name in ("unet", "text_encoder", "vae"):  # base weights untouched: only adapters and the new rows train
        trained = dict(getattr(c, name).named_parameters())
        for key, p in getattr(original, name).named_parameters():
            match = [k for k in trained if k.replace(".base_layer", "") == key]
            if match:
                assert torch.equal(trained[match[0]], p), f"{name}.{key} changed"
    assert (result.output / "pytorch_lora_weights.safetensors").is_file()


def test_vectors_stop_at_ti_frac(tiny_sd1, concept_images, tmp_path):
    """--ti-frac 0.5 of 4 steps: the vectors after step 2 are the final ones; the LoRA keeps moving."""
    api.train(pv_config(tiny_sd1, concept_images, tmp_path / "run", {"ti_frac": 0.5}, steps=4, checkpoint_every=1))
    ck = tmp_path / "run" / "checkpoints"
    state = {s: {} for s in (2, 3, 4)}
    for s in state:
        with safe_open(str(ck / f"step-{s:06d}" / "trained.safetensors"), "pt") as f:
            state[s] = {k: f.get_tensor(k) for k in f.keys()}
    assert torch.equal(state[2]["vectors"], state[4]["vectors"])
    lora_keys = [k for k in state[2] if k.startswith("unet.")]
    assert any(not torch.equal(state[2][k], state[4][k]) for k in lora_keys)


def test_resume_equals_uninterrupted(tiny_sd1, concept_images, tmp_path):
    # (--ti-frac 1: the stand-in for an interrupted run stops at --steps 2, which would move a fractional freeze)
    pv = {"ti_frac": 1.0}
    full = api.train(pv_config(tiny_sd1, concept_images, tmp_path / "a", pv, steps=4, checkpoint_every=2))
    api.train(pv_config(tiny_sd1, concept_images, tmp_path / "b", pv, steps=2, checkpoint_every=2))
    resumed = api.train(pv_config(tiny_sd1, concept_images, tmp_path / "b", pv, steps=4, checkpoint_every=2,
                                  resume="latest"))
    for name in ("learned_embeds.safetensors", "pytorch_lora_weights.safetensors"):
        with safe_open(str(full.output / name), "pt") as a, safe_open(str(resumed.output / name), "pt") as b:
            for k in a.keys():
                assert torch.allclose(a.get_tensor(k), b.get_tensor(k), atol=1e-6), (name, k)


def test_files_load_in_diffusers_in_the_bundle_and_in_conceptor(tiny_sd1, concept_images, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = api.train(pv_config(tiny_sd1, concept_images, tmp_path / "run", {"ti_frac": 1.0}))
    run = result.output
    bundle = run / "sks.safetensors"
    assert bundle in result.files
    with safe_open(str(bundle), "pt") as f:
        keys = set(f.keys())
    assert "bundle_emb.<sks>.string_to_param.*" in keys and any(k.startswith("lora_unet_") for k in keys)
    lora, embeddings = read_bundle(bundle)
    assert [e.token for e in embeddings] == ["<sks>"]
    assert torch.equal(embeddings[0].vectors, read_embedding(run / "learned_embeds.safetensors").vectors)

    # diffusers' own loaders on conceptor's two files == conceptor's one flag (--lora RUN: LoRA and tokens)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1), safety_checker=None)
    pipe.load_lora_weights(str(run))
    pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"))
    ours = api.load(str(tiny_sd1), loras=[str(run)]).components
    prompt = "a photo of <sks> <sks>_1 toy"  # what both pipelines make of "<sks>" (a two-vector token)
    x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    outs = []
    for tok, te, unet in ((pipe.tokenizer, pipe.text_encoder, pipe.unet), (ours.tokenizer, ours.text_encoder,
                                                                         ours.unet)):
        ids = tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            outs.append(unet(x, t, te(ids)[0]).sample)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    base = load_components(str(tiny_sd1))
    ids = base.tokenizer(["a photo of a toy"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(base.unet(x, t, base.text_encoder(ids)[0]).sample, outs[1], atol=1e-4)


def test_continue_from_an_earlier_lora_and_embedding(tiny_sd1, concept_images, tmp_path, cli, capsys):
    first = api.train(pv_config(tiny_sd1, concept_images, tmp_path / "a", {"ti_frac": 1.0}))
    c = load_components(str(tiny_sd1))
    cfg = pv_config(tiny_sd1, concept_images, tmp_path / "b",
                    {"init_embedding": str(first.output / "learned_embeds.safetensors"), "init_token": ""},
                    {"init_from": str(first.output / "sks.safetensors")}, steps=1, lr=1e-12)
    cfg.pivotal.embedding_lr = 1e-12  # a step that moves nothing: the run starts where the first one ended
    second = api.train(cfg, c)
    a = read_embedding(first.output / "learned_embeds.safetensors").vectors
    b = read_embedding(second.output / "learned_embeds.safetensors").vectors
    assert torch.allclose(a, b, atol=1e-6)
    with safe_open(str(first.output / "pytorch_lora_weights.safetensors"), "pt") as f1, \
            safe_open(str(second.output / "pytorch_lora_weights.safetensors"), "pt") as f2:
        for k in f1.keys():
            assert torch.allclose(f1.get_tensor(k), f2.get_tensor(k), atol=1e-5), k
    # a rank that does not fit: one line, exit 2, nothing written
    capsys.readouterr()
    code, _, err = cli("train", "pivotal", "--model", tiny_sd1, "--images", concept_images, "--token", "<z>",
                       "--init-token", "toy", "--rank", "4", "--init-lora", first.output / "sks.safetensors",
                       "--output", tmp_path / "c", "--steps", "1")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "rank 2" in errors[0] and "--rank 2" in errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("args, message", [
    (["--token", "toy"], "already"),  # a word the tokenizer knows
    (["--init-embedding", "{sdxl_emb}"], "wide"),
])
def test_bad_input_is_one_line(cli, tiny_sd1, concept_images, tmp_path, args, message):
    from conceptor.formats.embeddings import Embedding, write_embedding

    sdxl_emb = write_embedding(Embedding("<x>", torch.zeros(2, 64)), tmp_path / "wide.safetensors")
    args = [a.format(sdxl_emb=sdxl_emb) for a in args]
    base = {"--token": "<sks>", "--init-token": "toy"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    code, _, err = cli("train", "pivotal", "--model", tiny_sd1, "--images", concept_images,
                       *[x for kv in base.items() for x in kv], "--output", tmp_path / "out", "--steps", "1")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_bundle_alone_gives_the_lora_and_the_token(tiny_sd1, concept_images, tmp_path):
    """--lora BUNDLE.safetensors (A1111's one-file form) loads what --lora RUN loads."""
    result = api.train(pv_config(tiny_sd1, concept_images, tmp_path / "run", {"ti_frac": 1.0}))
    from_run = api.load(str(tiny_sd1), loras=[str(result.output)]).components
    from_bundle = api.load(str(tiny_sd1), loras=[str(result.output / "sks.safetensors")]).components
    x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    outs = []
    for c in (from_run, from_bundle):
        ids = c.tokenizer(["a photo of <sks> <sks>_1 toy"], padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
        with torch.no_grad():
            outs.append(c.unet(x, t, c.text_encoder(ids)[0]).sample)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_sdxl_trains_both_encoders_and_bundles_clip_l_and_clip_g(tiny_sdxl, concept_images, tmp_path):
    result = api.train(pv_config(tiny_sdxl, concept_images, tmp_path / "run", {"ti_frac": 1.0}, steps=2))
    emb = read_embedding(result.output / "learned_embeds.safetensors")
    assert emb.vectors.shape[0] == emb.vectors_2.shape[0] == 2 and emb.vectors.shape[1] != emb.vectors_2.shape[1]
    with safe_open(str(result.output / "sks.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"bundle_emb.<sks>.clip_l", "bundle_emb.<sks>.clip_g"} <= keys
    _, embeddings = read_bundle(result.output / "sks.safetensors")
    assert torch.equal(embeddings[0].vectors_2, emb.vectors_2)
    loaded = api.load(str(tiny_sdxl), loras=[str(result.output)])
    assert "<sks>" in loaded.components.tokenizer_2.get_vocab()

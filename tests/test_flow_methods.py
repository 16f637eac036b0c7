"""Every method on SD3 and Flux through the one loop: what trains, exact resume, files diffusers loads,
generation with what was learned, and the one-line refusals of options that would do nothing."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conceptor import api
from conceptor.config import build_config
from conceptor.formats.lora import read_lora
from conceptor.models.load import load_components
from conceptor.models.tiny import build_tiny_pipeline_folder


@pytest.fixture(scope="module")
def tiny_schnell(tmp_path_factory):
    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("schnell") / "m", "flux-schnell")


@pytest.fixture(params=["flux", "sd3"])
def flow_model(request, tiny_flux, tiny_sd3):
    return {"flux": tiny_flux, "sd3": tiny_sd3}[request.param]


def db_config(model, images, output, db=None, **train):
    steps = train.pop("steps", 4)
    return build_config("dreambooth", None, {
        "model": {"model": str(model)}, "data": {"images": str(images)}, "optim": {"lr": train.pop("lr", 1e-3)},
        "train": {"output": str(output), "steps": steps, "batch_size": 1, "log_every": 1, "checkpoint_every": 0,
                  **train},
        "dreambooth": {"instance_prompt": "a photo of sks toy", **(db or {})},
    })


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_lora_dreambooth_trains_only_adapters_and_resumes_exactly(flow_model, concept_images, tmp_path):
    components = load_components(str(flow_model))
    before = {name: _params(m) for name, m in (("transformer", components.transformer),
                                               *((f"te{i}", te) for i, te in enumerate(components.text_encoders)))}
    prior = {"lora": True, "rank": 2, "class_prompt": "a photo of a toy", "num_class_images": 2,
             "class_sampling_steps": 1}
    result = api.train(db_config(flow_model, concept_images, tmp_path / "a", prior, steps=4), components)
    # the base weights are untouched: peft's adapters are the only trained tensors
    for name, m in (("transformer", components.transformer),
                    *((f"te{i}", te) for i, te in enumerate(components.text_encoders))):
        for k, v in m.named_parameters():
            if "lora_" not in k:
                assert torch.equal(v.detach(), before[name][k.replace(".base_layer", "")]), k
    lora = read_lora(result.output / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert any(up.abs().sum() > 0 for _, up in lora.values())  # B starts at zero: it moved
    assert len(list((result.output / "class_images").iterdir())) == 2

    api.train(db_config(flow_model, concept_images, tmp_path / "b", prior, steps=2, checkpoint_every=2))
    api.train(db_config(flow_model, concept_images, tmp_path / "b", prior, steps=4, resume="latest"))
    resumed = read_lora(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(lora[k][0], resumed[k][0]) and torch.equal(lora[k][1], resumed[k][1]) for k in lora)


@torch.no_grad()
def _fixed_loss(c, images) -> float:
    """The flow loss of the training images at fixed noise and sigmas: comparable across training."""
    from conceptor.data.images import list_images, load_image, to_tensor
    from conceptor.families.flow import flow_loss_at
    from conceptor.methods.denoise import encode_latent_stats, scale_latents
    from conceptor.models.text import encode, token_ids

    pixels = torch.stack([to_tensor(load_image(p), 32, False) for p in list_images(images)])
    x0 = scale_latents(c.vae, encode_latent_stats(c.vae, pixels)[0])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    hidden, pooled = encode(c, token_ids(c, ["a photo of sks toy"] * len(x0)))
    sigmas = torch.linspace(0.2, 0.8, len(x0))
    return flow_loss_at(c, c.flow, x0, noise, sigmas, hidden, pooled, "none", 3.5).mean().item()


def test_training_lowers_the_loss_at_fixed_noise(tiny_flux, concept_images, tmp_path):
    c = load_components(str(tiny_flux))
    before = _fixed_loss(c, concept_images)
    api.train(db_config(tiny_flux, concept_images, tmp_path / "run", {"lora": True, "rank": 4}, steps=40, lr=5e-3,
                        seed=1), c)
    c.transformer.eval()
    assert _fixed_loss(c, concept_images) < 0.95 * before  # 1.50 -> 1.37 when written


def test_lora_text_encoder_trains_the_clip_encoders_only(flow_model, concept_images, tmp_path):
    result = api.train(db_config(flow_model, concept_images, tmp_path / "run",
                                 {"lora": True, "rank": 2, "lora_text_encoder": True}, steps=2))
    prefixes = {k.split(".")[0] for k in read_lora(result.output / "pytorch_lora_weights.safetensors")}
    family = load_components(str(flow_model)).family
    assert prefixes == ({"transformer", "text_encoder"} if family == "flux"
                        else {"transformer", "text_encoder", "text_encoder_2"})  # T5 never trains


def test_full_dreambooth_writes_a_pipeline_diffusers_loads(tiny_sd3, concept_images, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    original = load_components(str(tiny_sd3))
    result = api.train(db_config(tiny_sd3, concept_images, tmp_path / "run", steps=2, lr=1e-3))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(result.output))
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(),
                                                     original.transformer.parameters()))
    for mine, theirs in ((pipe.vae, original.vae), (pipe.text_encoder_3, original.text_encoder_3)):
        assert all(torch.equal(a, b) for a, b in zip(mine.parameters(), theirs.parameters()))


def test_textual_inversion_learns_only_new_clip_rows(flow_model, concept_images, tmp_path, cli):
    code, _, err = cli("train", "textual-inversion", "--model", flow_model, "--images", concept_images,
                       "--token", "<sks>", "--init-token", "toy", "--vectors", "2", "--steps", "3",
                       "--output", tmp_path / "ti", "--log-every", "1")
    assert code == 0, err
    saved = load_file(tmp_path / "ti" / "learned_embeds.safetensors")
    family = load_components(str(flow_model)).family
    if family == "sd3":  # CLIP-L and CLIP-G rows, the layout A1111/ComfyUI read for two CLIP encoders
        assert set(saved) == {"clip_l", "clip_g"} and saved["clip_l"].shape[0] == saved["clip_g"].shape[0] == 2
    else:
        assert set(saved) == {"<sks>"} and saved["<sks>"].shape == (2, 32)  # Flux's CLIP-L
    model = api.load(str(flow_model), [tmp_path / "ti"])
    assert model.tokens == {"<sks>": 2}
    with_token = model.generate("a <sks> toy", steps=2, seed=3, width=32, height=32)[0]
    plain = api.load(str(flow_model)).generate("a <sks> toy", steps=2, seed=3, width=32, height=32)[0]
    assert with_token.size == (32, 32) and with_token.tobytes() != plain.tobytes()


def test_transformer_only_single_file_loads_with_model_config(tiny_flux, tmp_path, cli):
    full = load_components(str(tiny_flux))
    file = tmp_path / "flux-transformer.safetensors"
    save_file({k: v.contiguous() for k, v in full.transformer.state_dict().items()}, str(file))
    single = load_components(str(file), model_config=str(tiny_flux))
    assert single.family == "flux" and single.source == str(file)
    assert all(torch.equal(a, b) for a, b in zip(single.transformer.parameters(), full.transformer.parameters()))
    code, _, err = cli("generate", "--model", file, "--prompt", "x", "--output", tmp_path / "out")
    assert code == 2 and "--model-config" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--guidance-scale", "2"], "guidance embedding"),  # schnell has none
    (["--snr-gamma", "5"], "--loss-weighting"),
    (["--noise-offset", "0.1"], "--noise-offset"),
])
def test_options_that_would_do_nothing_on_flow_models(tiny_schnell, concept_images, tmp_path, cli, flags, needle):
    code, _, err = cli("train", "dreambooth", "--model", tiny_schnell, "--images", concept_images,
                       "--instance-prompt", "a sks toy", "--lora", "--steps", "1", "--output", tmp_path / "run", *flags)
    last = err.strip().splitlines()[-1]  # after the memory estimate (printed before the model loads)
    assert code == 2 and last.startswith("error:") and needle in last and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [["--timestep-sampling", "uniform"], ["--flow-shift", "2"],
                                   ["--max-sequence-length", "64"]])
def test_flow_options_are_refused_on_unet_models(tiny_sd1, concept_images, tmp_path, cli, flags):
    code, _, err = cli("train", "dreambooth", "--model", tiny_sd1, "--images", concept_images,
                       "--instance-prompt", "a sks toy", "--lora", "--steps", "1", "--output", tmp_path / "run", *flags)
    assert code == 2 and flags[0] in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_unet_samplers_are_refused_on_flow_models(tiny_flux, tmp_path, cli):
    code, _, err = cli("generate", "--model", tiny_flux, "--prompt", "x", "--scheduler", "dpm++",
                       "--output", tmp_path / "out")
    assert code == 2 and "euler" in err and not (tmp_path / "out").exists()


def test_generate_with_a_lora_matches_diffusers_loading_it(tiny_flux, tiny_sd3, concept_images, tmp_path, cli):
    """The run's LoRA through `conceptor generate --lora` (merged) and through the pipeline's own
    load_lora_weights + fuse_lora: the same transformer weights, so the same pictures. Its kohya/ComfyUI form
    (Flux) merges to the same weights again. (diffusers' kohya-Flux converter assumes Flux.1's full widths, so
    it is run on full-size layers in test_lora_flow.py, not here.)"""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    for model, cls in ((tiny_flux, FluxPipeline), (tiny_sd3, StableDiffusion3Pipeline)):
        run = tmp_path / model.parent.name
        api.train(db_config(model, concept_images, run, {"lora": True, "rank": 2, "lora_targets": "attn-ff"},
                            steps=3, lr=1e-2))
        file = run / "pytorch_lora_weights.safetensors"
        mine = api.load(str(model), loras=[file]).components.transformer
        pipe = cls.from_pretrained(model, local_files_only=True)
        pipe.load_lora_weights(str(file))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused weights stay; the adapters go
        theirs = dict(pipe.transformer.named_parameters())
        base = dict(load_components(str(model)).transformer.named_parameters())
        for name, p in mine.named_parameters():
            assert torch.allclose(p, theirs[name], atol=1e-5), name
        assert any(not torch.equal(p, base[name]) for name, p in mine.named_parameters())
        if cls is FluxPipeline:  # the single blocks' output projections (attn-ff) moved, the top-level one not
            assert not torch.equal(mine.single_transformer_blocks[0].proj_out.weight,
                                   base["single_transformer_blocks.0.proj_out.weight"])
            assert torch.equal(mine.proj_out.weight, base["proj_out.weight"])
            code, _, err = cli("convert", "lora", file, run / "kohya.safetensors", "--to", "kohya")
            assert code == 0, err
            via_kohya = api.load(str(model), loras=[run / "kohya.safetensors"]).components.transformer
            for a, b in zip(via_kohya.parameters(), mine.parameters()):
                assert torch.allclose(a, b, atol=1e-6)
        code, out, err = cli("generate", "--model", model, "--lora", file, "--prompt", "a sks toy", "--steps", "2",
                             "--output", run / "images")
        assert code == 0 and (run / "images" / "000-seed0.png").is_file(), err
    flux_kohya = tmp_path / tiny_flux.parent.name / "kohya.safetensors"
    code, _, err = cli("generate", "--model", tiny_sd3, "--lora", flux_kohya, "--prompt", "x",
                       "--output", tmp_path / "nothing")
    assert code == 2 and "trained for Flux" in err and not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("mode", ["nf4", "fp8"])
def test_lora_on_a_quantized_base(tiny_flux, concept_images, tmp_path, mode):
    """QLoRA-style: the frozen transformer's block Linears in nf4 (bitsandbytes) or fp8 (optimum-quanto), the
    LoRA in fp32; the file has the same layers as a LoRA of the full-precision model, and loads in diffusers."""
    from diffusers import FluxPipeline

    from conceptor.models.quantize import is_quantized

    c = load_components(str(tiny_flux))
    result = api.train(db_config(tiny_flux, concept_images, tmp_path / "q", {"lora": True, "rank": 2}, steps=2,
                                 quantize=mode), c)
    assert is_quantized(c.transformer)
    plain = api.train(db_config(tiny_flux, concept_images, tmp_path / "p", {"lora": True, "rank": 2}, steps=2))
    q = read_lora(result.output / "pytorch_lora_weights.safetensors")
    assert q.keys() == read_lora(plain.output / "pytorch_lora_weights.safetensors").keys()
    assert all(torch.isfinite(up).all() and up.abs().sum() > 0 for _, up in q.values())
    pipe = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    pipe.load_lora_weights(str(result.output))


def test_quantize_needs_a_lora(tiny_flux, concept_images, tmp_path, cli):
    code, _, err = cli("train", "dreambooth", "--model", tiny_flux, "--images", concept_images, "--instance-prompt",
                       "a sks toy", "--quantize", "nf4", "--steps", "1", "--output", tmp_path / "run")
    assert code == 2 and "--lora" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_hub_id_loads_from_the_cache_offline(tiny_flux, tmp_path):
    """What users type (org/name) goes through the Hugging Face cache: a snapshot laid out as the hub client
    writes it, read offline in a fresh process (the libraries read the cache location at import)."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--someone--tiny-flux"
    commit = "0123456789abcdef0123456789abcdef01234567"  # the hub client names snapshots by commit hash
    shutil.copytree(tiny_flux, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "conceptor", "generate", "--model", "someone/tiny-flux", "--prompt",
                           "a toy", "--steps", "1", "--output", str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "000-seed0.png").is_file()
    proc = subprocess.run([sys.executable, "-m", "conceptor", "generate", "--model", "someone/not-cached",
                           "--prompt", "x", "--output", str(tmp_path / "none")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2 and "HF_HUB_OFFLINE" in proc.stderr and "Traceback" not in proc.stderr


def test_schnell_shaped_models_take_real_cfg_and_dev_refuses_negative_prompts(tiny_schnell, tiny_flux, tmp_path, cli):
    """A Flux without a guidance embedding samples with true classifier-free guidance above scale 1 (and
    takes a negative prompt); its default is 1, no extra pass. Flux.1-dev's guidance is its embedding."""
    model = api.load(str(tiny_schnell))
    assert model.default_guidance == 1.0
    plain = model.generate("a red thing", steps=2, seed=1, width=32, height=32)[0]
    guided = model.generate("a red thing", steps=2, seed=1, width=32, height=32, guidance=3.0)[0]
    negative = model.generate("a red thing", steps=2, seed=1, width=32, height=32, guidance=3.0,
                              negative_prompt="blue")[0]
    assert plain.tobytes() != guided.tobytes() != negative.tobytes()
    assert api.load(str(tiny_flux)).default_guidance == 3.5
    code, _, err = cli("generate", "--model", tiny_flux, "--prompt", "x", "--negative-prompt", "blue",
                       "--output", tmp_path / "out")
    assert code == 2 and "negative" in err.strip().splitlines()[-1]


def test_the_bundled_flux_toy_model_loads_and_draws():
    from conceptor.toyworld import FLUX_MODEL_FOLDER

    c = load_components(str(FLUX_MODEL_FOLDER))
    assert c.family == "flux" and c.default_resolution == 64 and c.max_sequence_length == 24
    assert c.default_guidance == 2.0  # measured best for it (docs/benchmarks.md)
    image = api.load(str(FLUX_MODEL_FOLDER)).generate("a photo of a red circle", steps=4, seed=0)[0]
    assert image.size == (64, 64)

"""SDXL on a tiny SDXL-shaped pipeline: textual inversion trains BOTH text encoders, the one-file
clip_l/clip_g embedding loads in diffusers' SDXL pipeline and in conceptor generate, conversions."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from conceptor import api
from conceptor.config import build_config
from conceptor.models.load import load_components


def test_loader_detects_sdxl(tiny_sdxl, tiny_sd1):
    c = load_components(str(tiny_sdxl))
    assert c.family == "sdxl" and c.is_sdxl and len(c.text_encoders) == 2
    assert load_components(str(tiny_sd1)).text_encoder_2 is None


def test_ti_trains_both_encoders_and_diffusers_loads_the_file(tiny_sdxl, concept_images, tmp_path, cli):
    from diffusers import StableDiffusionXLPipeline

    original = load_components(str(tiny_sdxl))
    components = load_components(str(tiny_sdxl))
    cfg = build_config("textual-inversion", None, {
        "model": {"model": str(tiny_sdxl)}, "data": {"images": str(concept_images)}, "optim": {"lr": 5e-2},
        "train": {"output": str(tmp_path / "run"), "steps": 4, "batch_size": 2, "checkpoint_every": 0},
        "textual_inversion": {"token": "<t>", "init_token": "toy", "vectors": 2}})
    result = api.train(cfg, components)
    saved = load_file(str(result.output / "learned_embeds.safetensors"))
    assert set(saved) == {"clip_l", "clip_g"}
    assert saved["clip_l"].shape == (2, 32) and saved["clip_g"].shape == (2, 48)
    for k, (te, te0, tok) in enumerate(zip(components.text_encoders, original.text_encoders, original.tokenizers)):
        init = te0.get_input_embeddings().weight[tok.convert_tokens_to_ids("toy</w>")]
        vectors = saved["clip_l" if k == 0 else "clip_g"]
        assert all((vectors[i] - init).abs().max() > 1e-3 for i in range(2)), f"encoder {k + 1} did not train"
        assert torch.equal(te.get_input_embeddings().base.weight, te0.get_input_embeddings().weight)
    for a, b in zip(components.unet.parameters(), original.unet.parameters()):
        assert torch.equal(a, b)

    # The two calls README shows for diffusers.
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    pipe.load_textual_inversion(saved["clip_l"], token=["<t>", "<t>_1"], text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(saved["clip_g"], token=["<t>", "<t>_1"], text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a photo of <t> <t>_1", num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)

    code, _, err = cli("generate", "--model", tiny_sdxl, "--embedding", result.output, "--prompt", "a photo of <t>",
                       "--steps", "2", "--output", tmp_path / "img")
    assert code == 0, err
    code, _, err = cli("convert", "embedding", result.output / "learned_embeds.safetensors", tmp_path / "two",
                       "--to", "diffusers")
    assert code == 0, err
    assert torch.equal(load_file(str(tmp_path / "two" / "learned_embeds_2.safetensors"))["<t>"], saved["clip_g"])


def test_sd1_embedding_on_sdxl_is_a_clear_error(tiny_sdxl, tiny_sd1, concept_images, tmp_path, cli):
    code, _, err = cli("train", "textual-inversion", "--model", tiny_sd1, "--images", concept_images, "--token",
                       "<t>", "--init-token", "toy", "--steps", "1", "--output", tmp_path / "sd1")
    assert code == 0, err
    code, _, err = cli("generate", "--model", tiny_sdxl, "--embedding", tmp_path / "sd1", "--prompt", "<t>")
    assert code == 2 and "SD 1/2 embedding but the model is SDXL" in err


def _db(tiny, images, out, **db):
    return build_config("dreambooth", None, {
        "model": {"model": str(tiny)}, "data": {"images": str(images)}, "optim": {"lr": 1e-2},
        "train": {"output": str(out), "steps": 3, "batch_size": 1, "checkpoint_every": 0},
        "dreambooth": {"instance_prompt": "a photo of sks toy", **db}})


def test_dreambooth_lora_both_encoders_loads_in_diffusers_and_kohya(tiny_sdxl, concept_images, tmp_path, cli):
    from diffusers import StableDiffusionXLPipeline

    from conceptor.formats.lora import apply_lora, read_lora

    components = load_components(str(tiny_sdxl))
    result = api.train(_db(tiny_sdxl, concept_images, tmp_path / "run", lora=True, rank=2, lora_text_encoder=True,
                           class_prompt="a photo of a toy", num_class_images=2, class_sampling_steps=2), components)
    lora = read_lora(result.output / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in lora} == {"unet", "text_encoder", "text_encoder_2"}

    mine = load_components(str(tiny_sdxl))
    apply_lora(lora, mine.unet, mine.text_encoder, 1.0, mine.text_encoder_2)
    code, _, err = cli("convert", "lora", result.output / "pytorch_lora_weights.safetensors",
                       tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 0, err
    keys = load_file(str(tmp_path / "k.safetensors"))
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    for source in (result.output, tmp_path / "k.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
        pipe.load_lora_weights(str(source))
        x, t = torch.randn(1, 4, 4, 4), torch.tensor([400])
        h, pooled = torch.randn(1, 77, 80), torch.randn(1, 48)
        cond = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
        with torch.no_grad():
            theirs = pipe.unet(x, t, h, added_cond_kwargs=cond).sample
            ours = mine.unet(x, t, h, added_cond_kwargs=cond).sample
            ids = pipe.tokenizer_2(["a photo of sks toy"], padding="max_length", max_length=77,
                                   return_tensors="pt").input_ids
            te_theirs = pipe.text_encoder_2(ids).text_embeds
            te_ours = mine.text_encoder_2(ids).text_embeds
        assert torch.allclose(theirs, ours, atol=1e-5), source
        assert torch.allclose(te_theirs, te_ours, atol=1e-5), source


def test_full_dreambooth_writes_an_sdxl_pipeline(tiny_sdxl, concept_images, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    original = load_components(str(tiny_sdxl))
    result = api.train(_db(tiny_sdxl, concept_images, tmp_path / "run", train_text_encoder=True))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(result.output))
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), original.unet.parameters()))
    assert any(not torch.equal(a, b) for a, b in
               zip(pipe.text_encoder_2.parameters(), original.text_encoder_2.parameters()))


def test_finetune_sdxl_with_buckets(tiny_sdxl, concept_images, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from conceptor.data.buckets import center_crop_offset, fit

    assert fit(Image.new("RGB", (1000, 500)), (704, 320))[1] == center_crop_offset((1000, 500), (704, 320))
    Image.new("RGB", (48, 32), (200, 30, 30)).save(concept_images / "wide.png")
    rows = ["image_path,caption"] + [f"{p.name},a round thing {i}"
                                     for i, p in enumerate(sorted(concept_images.glob("*.png")))]
    (concept_images / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = build_config("finetune", None, {
        "model": {"model": str(tiny_sdxl)}, "optim": {"lr": 1e-3},
        "train": {"output": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "checkpoint_every": 0},
        "finetune": {"dataset": str(concept_images / "data.csv"), "buckets": True, "cache_dir": str(tmp_path / "c"),
                     "caption_dropout": 0.5}})
    result = api.train(cfg)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(result.output))
    original = load_components(str(tiny_sdxl))
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), original.unet.parameters()))


def test_vae_override(tiny_sdxl, tiny_sd1, tmp_path, cli):
    from conceptor.config import ModelConfig

    c = api.resolve_model(ModelConfig(model=str(tiny_sdxl), vae=str(tiny_sd1)))  # a folder with vae/ inside
    other = load_components(str(tiny_sd1)).vae
    assert all(torch.equal(a, b) for a, b in zip(c.vae.parameters(), other.parameters()))
    code, _, err = cli("generate", "--model", tiny_sdxl, "--vae", tmp_path / "nope", "--prompt", "x")
    assert code == 2 and "could not load --vae" in err


def test_single_file_round_trip_through_diffusers(tiny_sdxl, tmp_path):
    """Our LDM-layout SDXL file, read back by diffusers' from_single_file (what A1111/ComfyUI layouts go
    through), gives every weight back exactly; conceptor loads it as SDXL."""
    from diffusers import StableDiffusionXLPipeline

    from conceptor.formats.ldm_checkpoint import save_single_file

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    path = save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "xl.safetensors", "sdxl",
                            text_encoder_2=pipe.text_encoder_2)
    keys = load_file(str(path))
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert any(k.startswith("model.diffusion_model.label_emb") for k in keys)
    back = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        for k in a:
            if k.endswith("position_ids"):
                continue
            assert torch.equal(a[k], b[k]), f"{name}.{k}"
    c = load_components(str(path), model_config=str(tiny_sdxl))
    assert c.family == "sdxl"

"""Tiny SD3- and Flux-shaped pipeline folders: diffusers' own pipelines load and run them, offline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conceptor.models.tiny import build_tiny_pipeline_folder
from conceptor.models.tiny_flow import FAMILIES, build_tiny_flow_folder

PIPELINE = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "flux-schnell": "FluxPipeline"}
T5_TOKENIZER = {"sd3": "tokenizer_3", "flux": "tokenizer_2", "flux-schnell": "tokenizer_2"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_flow")
    return {family: build_tiny_pipeline_folder(root / family, family) for family in FAMILIES}


def load_pipeline(folder: Path, family: str):
    import diffusers

    return getattr(diffusers, PIPELINE[family]).from_pretrained(folder, local_files_only=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_pipeline_generates_at_declared_resolution(folders, family):
    folder = folders[family]
    resolution = json.loads((folder / "conceptor.json").read_text())["resolution"]
    pipe = load_pipeline(folder, family)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"guidance_scale": 3.5} if family != "flux-schnell" else {"guidance_scale": 0.0}
    image = pipe("a photo of a sks dog", num_inference_steps=2, height=resolution, width=resolution,
                 max_sequence_length=16, output_type="pil", generator=torch.Generator().manual_seed(0),
                 **kwargs).images[0]
    assert image.size == (resolution, resolution)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE[family]
    for name, (_, class_name) in ((k, v) for k, v in index.items() if not k.startswith("_")):
        assert type(getattr(pipe, name)).__name__ in (class_name, class_name.removesuffix("Fast")), name


@pytest.mark.parametrize("family", FAMILIES)
def test_real_shapes_where_they_matter(folders, family):
    folder = folders[family]
    vae = json.loads((folder / "vae" / "config.json").read_text())
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert vae["latent_channels"] == 16 and len(vae["block_out_channels"]) == 4
    assert not vae["use_quant_conv"] and not vae["use_post_quant_conv"]
    assert (vae["scaling_factor"], vae["shift_factor"]) == ((1.5305, 0.0609) if family == "sd3" else (0.3611, 0.1159))
    t5_width = json.loads((folder / f"text_encoder_{T5_TOKENIZER[family][-1]}" / "config.json").read_text())["d_model"]
    assert transformer["joint_attention_dim"] == t5_width
    if family == "sd3":
        clip = [json.loads((folder / te / "config.json").read_text()) for te in ("text_encoder", "text_encoder_2")]
        assert clip[0]["hidden_size"] != clip[1]["hidden_size"]
        assert t5_width > clip[0]["hidden_size"] + clip[1]["hidden_size"]
        assert transformer["pooled_projection_dim"] == clip[0]["projection_dim"] + clip[1]["projection_dim"]
        assert transformer["dual_attention_layers"] == [0] and transformer["qk_norm"] == "rms_norm"
        assert scheduler["shift"] == 3.0
    else:
        assert transformer["in_channels"] == 64 and transformer["patch_size"] == 1
        assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
        assert transformer["guidance_embeds"] == (family == "flux")
        assert scheduler["use_dynamic_shifting"] == (family == "flux")


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_is_built_not_downloaded(folders, family):
    folder = folders[family]
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    allowed_suffixes = (".json", ".safetensors", ".txt")
    assert all(f.endswith(allowed_suffixes) for f in files), files
    assert not any(part.startswith(".") for f in files for part in f.split("/")), files  # no .cache / .gitattributes
    assert not any(f.endswith(("spiece.model", "README.md")) for f in files)


@pytest.mark.parametrize("family", FAMILIES)
def test_t5_tokenizer_takes_new_tokens(folders, family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders[family] / T5_TOKENIZER[family], local_files_only=True)
    assert tok.model_max_length == 512
    assert tok.add_tokens(["<new>"]) == 1
    new_id = tok.convert_tokens_to_ids("<new>")
    assert tok.tokenize("<new>") == ["<new>"]
    assert tok("a <new> dog").input_ids.count(new_id) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_bytes(tmp_path, family):
    a = build_tiny_flow_folder(tmp_path / "a", family, seed=3)
    b = build_tiny_flow_folder(tmp_path / "b", family, seed=3)
    c = build_tiny_flow_folder(tmp_path / "c", family, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    weights = Path("transformer/diffusion_pytorch_model.safetensors")
    assert (a / weights).read_bytes() != (c / weights).read_bytes()


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="flux-schnell"):
        build_tiny_flow_folder(tmp_path, "flux-pro")

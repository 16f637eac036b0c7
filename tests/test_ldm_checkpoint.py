"""LDM single-file export: what we write, diffusers' own from_single_file reads back bit for bit.

from_single_file runs diffusers' LDM -> diffusers converters (the same layout A1111 and ComfyUI read), so
an exact round trip shows every key name, fused q/k/v split and reshape is the exact inverse.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from conceptor.errors import ConceptorError
from conceptor.formats.ldm_checkpoint import diffusers_to_ldm, open_clip_to_ldm, save_single_file

PARTS = ("unet", "vae", "text_encoder")


def _export(tmp_path_factory, family):
    from diffusers import StableDiffusionPipeline

    from conceptor.models.tiny import build_tiny_pipeline_folder

    root = tmp_path_factory.mktemp(f"ldm_{family}")
    folder = build_tiny_pipeline_folder(root / "pipe", family)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None)
    path = save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, root / "model.safetensors", family)
    return folder, pipe, path


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _export(tmp_path_factory, "sd1")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return _export(tmp_path_factory, "sd2")


def _keys_and_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("family,prediction", [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_from_single_file_round_trip_is_exact(request, family, prediction):
    from diffusers import StableDiffusionPipeline

    folder, original, path = request.getfixturevalue(family)
    # config must be a str (a Path is rejected by the per-model loaders); with a local config folder the
    # scheduler comes from folder/scheduler, so no prediction_type= is needed (passing it switches diffusers
    # to a legacy scheduler with wrong betas).
    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None)
    for part in PARTS:
        a, b = getattr(original, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys(), part
        assert all(b[k].device.type != "meta" for k in b), f"{part}: weights missing from the file"
        assert not [k for k in a if not torch.equal(a[k], b[k])], part
    assert loaded.scheduler.config.prediction_type == prediction
    for field in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        assert loaded.scheduler.config[field] == original.scheduler.config[field]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_keys_are_ldm_layout(request, family):
    folder, pipe, path = request.getfixturevalue(family)
    keys, meta = _keys_and_meta(path)
    assert meta == {"format": "ldm", "family": family, "prediction_type": "epsilon"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "model.diffusion_model.output_blocks.0.0.skip_connection.weight" in keys
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in keys
    assert keys["first_stage_model.decoder.mid.attn_1.q.weight"] == [16, 16, 1, 1]  # 1x1 conv in LDM
    fused = 0 if family == "sd1" else 2 * 4  # sd2: q/k/v weight+bias (6 keys) -> in_proj (2), in 2 layers
    assert len(keys) == sum(len(getattr(pipe, p).state_dict()) for p in PARTS) - fused
    assert not [k for k in keys if k.startswith("first_stage_model.") and ("_blocks." in k or "to_" in k)]
    if family == "sd1":
        assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
        assert not [k for k in keys if k.startswith("cond_stage_model.model.")]
    else:
        assert keys["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"] == [96, 32]
        assert {"cond_stage_model.model.token_embedding.weight", "cond_stage_model.model.positional_embedding",
                "cond_stage_model.model.ln_final.weight",
                "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight"} <= keys.keys()
        assert not [k for k in keys if k.startswith("cond_stage_model.transformer.")]


def test_fp16_export_and_pure_conversion(sd1, tmp_path):
    _, pipe, _ = sd1
    path = save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "half.safetensors", "sd1",
                            dtype=torch.float16)
    from safetensors.torch import load_file

    half = load_file(str(path))
    assert {v.dtype for v in half.values()} == {torch.float16}
    sds = [getattr(pipe, p).state_dict() for p in PARTS]
    full = diffusers_to_ldm(*sds, "sd1")
    assert full.keys() == half.keys()
    assert torch.equal(full["model.diffusion_model.out.2.weight"], pipe.unet.conv_out.weight)  # same tensors
    with pytest.raises(ConceptorError, match="family"):
        diffusers_to_ldm(*sds, "sd3")
    with pytest.raises(ConceptorError, match="foo_embedding"):  # unknown keys are refused, never dropped
        diffusers_to_ldm({**sds[0], "foo_embedding.linear_1.weight": torch.zeros(1)}, sds[1], sds[2], "sd1")


def test_sd2_23_layer_encoder_gets_identity_24th_block():
    """Real SD2: diffusers keeps 23 of OpenCLIP's 24 blocks; we write block 23 as zeros (an exact identity)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    def encoder(layers):
        torch.manual_seed(0)
        return CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                            num_hidden_layers=layers, vocab_size=50, max_position_embeddings=8,
                                            hidden_act="gelu")).eval()

    te23 = encoder(23)
    ldm = open_clip_to_ldm(te23.state_dict())
    last = {k: v for k, v in ldm.items() if ".resblocks.23." in k}
    assert len(last) == 12 and all(not v.any() for v in last.values())
    # diffusers' loader ignores block 23 and restores the 23-layer encoder exactly.
    back = convert_open_clip_checkpoint(te23, ldm)
    ref = {k: v for k, v in te23.state_dict().items() if not k.endswith("position_ids")}
    assert {k.removeprefix("text_model.") for k in back} == {k.removeprefix("text_model.") for k in ref}
    back = {k.removeprefix("text_model."): v for k, v in back.items()}
    assert all(torch.equal(back[k.removeprefix("text_model.")], v) for k, v in ref.items())
    # A tool that runs all 24 blocks gets the same embedding as the 23-block encoder.
    te24 = encoder(24)
    sd = dict(te23.state_dict())
    sd.update({k.replace("layers.22.", "layers.23."): torch.zeros_like(v) for k, v in sd.items() if "layers.22." in k})
    te24.load_state_dict(sd)
    ids = torch.tensor([[1, 5, 7, 3, 2]])
    with torch.no_grad():
        assert torch.allclose(te23(ids).last_hidden_state, te24(ids).last_hidden_state, atol=1e-6)


@pytest.mark.parametrize("family,prediction", [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_sidecar_yaml_says_what_the_ldm_layout_cannot(request, family, prediction, tmp_path):
    import yaml
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from conceptor.formats.ldm_checkpoint import save_single_file_with_yaml

    pipe = StableDiffusionPipeline.from_pretrained(str(request.getfixturevalue(f"tiny_{family}")), safety_checker=None)
    ckpt, side = save_single_file_with_yaml(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "m.safetensors",
                                            family, prediction, pipe.scheduler.config)
    assert side == tmp_path / "m.yaml"
    params = yaml.safe_load(side.read_text())["model"]["params"]
    assert params.get("parameterization", "eps") == ("v" if prediction == "v_prediction" else "eps")
    unet = params["unet_config"]["params"]
    assert unet["model_channels"] == pipe.unet.config.block_out_channels[0]
    assert unet["context_dim"] == pipe.unet.config.cross_attention_dim
    assert params["scale_factor"] == pytest.approx(pipe.vae.config.scaling_factor)
    assert ("OpenCLIP" in params["cond_stage_config"]["target"]) == (family == "sd2")
    with safe_open(str(ckpt), "pt") as f:
        assert f.metadata()["prediction_type"] == prediction

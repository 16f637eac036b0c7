"""SD3/SD3.5 and Flux.1 LoRA files, with diffusers' own loaders and converters as oracles.

Each oracle builds a tiny transformer, injects a PEFT LoRA with random non-zero A and B, and checks that what
diffusers merges from our file (``load_lora_weights`` + ``fuse_lora``, or its kohya->diffusers converter) is
what ``apply_lora_to`` merges, to 1e-5.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from conceptor.errors import ConceptorError
from conceptor.formats.lora import (
    apply_lora,
    apply_lora_to,
    convert_lora,
    lora_family,
    lora_from_peft,
    read_lora,
    write_lora,
)

pytest.importorskip("diffusers")

# Every Linear of a Flux double block, and of a single block but its fused q/k/v/mlp (see test below).
FLUX_DOUBLE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2", "norm1.linear", "norm1_context.linear"]
FLUX_SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"]
FLUX_GLOBAL = ["x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
               "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
               "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
               "time_text_embed.guidance_embedder.linear_2", "proj_out", "norm_out.linear"]


def tiny_flux(guidance: bool = False):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                                 pooled_projection_dim=16, out_channels=4, dual_attention_layers=(0,))


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=100, projection_dim=32, bos_token_id=98,
                                        eos_token_id=99, pad_token_id=99))


def peft_lora(model, prefix: str, targets: list[str], rank: int = 4, alpha: float = 8.0, seed: int = 1,
              rank_pattern: dict | None = None):
    """Our in-memory LoRA of a copy of ``model`` with a PEFT adapter on ``targets`` (full module paths)."""
    from peft import LoraConfig, inject_adapter_in_model

    trained = copy.deepcopy(model)
    pattern = "|".join(t.replace(".", r"\.") for t in targets)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=rf"^(?:{pattern})$",
                                       rank_pattern=rank_pattern or {}), trained)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lora = lora_from_peft(trained, prefix)
    assert len(lora) == len(targets)
    return lora


def merged(model, lora, prefix: str = "transformer"):
    ours = copy.deepcopy(model)
    assert apply_lora_to(lora, {prefix: ours}) == len(lora)
    return ours


def fused_by_diffusers(pipe_cls, model, file, **components) -> list[dict]:
    """Weights of copies of the transformer and ``components`` after diffusers' own ``load_lora_weights`` +
    ``fuse_lora``, keyed like the plain models'."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    modules = [copy.deepcopy(model)] + [copy.deepcopy(m) for m in components.values()]
    names = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    if pipe_cls.__name__.startswith("StableDiffusion3"):
        names += ("text_encoder_3", "tokenizer_3")
    parts = {n: None for n in names} | dict(zip(components, modules[1:]))
    pipe = pipe_cls(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=modules[0], **parts)
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora(components=list(pipe._lora_loadable_modules))  # Flux's default fuses the transformer only
    return [{k.replace(".base_layer.", "."): v for k, v in m.state_dict().items() if "lora_" not in k}
            for m in modules]


def assert_same_weights(a: torch.nn.Module | dict, b: torch.nn.Module, base: torch.nn.Module, changed: int):
    sa = a if isinstance(a, dict) else a.state_dict()
    sb, s0 = b.state_dict(), base.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-5, rtol=0, msg=k)
    moved = [k for k in sb if not torch.equal(sb[k], s0[k])]
    assert len(moved) == changed  # the oracle compared real updates, not two untouched models


def flux_targets(model, single=True, glob=False) -> list[str]:
    out = [f"transformer_blocks.{i}.{m}" for i in range(len(model.transformer_blocks)) for m in FLUX_DOUBLE]
    if single:
        out += [f"single_transformer_blocks.{i}.{m}" for i in range(len(model.single_transformer_blocks))
                for m in FLUX_SINGLE]
    return out + [m for m in FLUX_GLOBAL if glob and dict(model.named_modules()).get(m) is not None]


def test_flux_diffusers_file_is_what_flux_pipeline_fuses(tmp_path):
    from diffusers import FluxPipeline

    model = tiny_flux(guidance=True)
    lora = peft_lora(model, "transformer", flux_targets(model, glob=True))
    assert lora_family(lora) == "flux"
    write_lora(lora, tmp_path / "f.safetensors")
    assert all(k.startswith("transformer.") and ".lora_" in k for k in load_file(tmp_path / "f.safetensors"))
    theirs = fused_by_diffusers(FluxPipeline, model, tmp_path / "f.safetensors")
    ours = merged(model, read_lora(tmp_path / "f.safetensors"))
    assert_same_weights(theirs[0], ours, model, changed=len(lora))


def test_sd3_diffusers_file_is_what_sd3_pipeline_fuses(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    model = tiny_sd3()
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n]
    assert any(".attn2." in t for t in targets)  # SD3.5's second (MMDiT-X) attention is covered too
    lora = peft_lora(model, "transformer", targets)
    assert lora_family(lora) == "sd3"
    write_lora(lora, tmp_path / "s.safetensors")
    theirs = fused_by_diffusers(StableDiffusion3Pipeline, model, tmp_path / "s.safetensors")
    assert_same_weights(theirs[0], merged(model, read_lora(tmp_path / "s.safetensors")), model,
                        changed=len(lora))
    with pytest.raises(ConceptorError, match="no SD3 LoRA layout") as err:
        write_lora(lora, tmp_path / "k.safetensors", "kohya")
    assert "\n" not in str(err.value)


def test_flux_kohya_file_is_what_diffusers_converter_fuses(tmp_path):
    """Every double-block layer (txt q/v without k: a partial fused qkv) plus linear2 and modulation_lin of the single
    blocks, and CLIP-L; diffusers' converter asserts Flux.1-dev's widths for linear1, tested apart below."""
    from diffusers import FluxPipeline

    model, clip = tiny_flux(), tiny_clip()
    targets = [t for t in flux_targets(model) if not t.endswith(("add_k_proj", "to_q", "to_k", "to_v", "proj_mlp"))
               or t.startswith("transformer_blocks.") and not t.endswith("add_k_proj")]
    assert "transformer_blocks.0.attn.to_k" in targets and "transformer_blocks.0.attn.add_k_proj" not in targets
    lora = peft_lora(model, "transformer", targets)
    te_targets = [n for n, m in clip.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert len(te_targets) == 12  # q, k, v, out, fc1, fc2 of both layers (with or without transformers 4's text_model.)
    te_lora = peft_lora(clip, "text_encoder", te_targets, rank=2, alpha=3.0)
    write_lora(lora | te_lora, tmp_path / "k.safetensors", "kohya")
    keys = load_file(tmp_path / "k.safetensors").keys()
    assert "lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_1_linear2.alpha" in keys
    assert not any(k.startswith("lora_unet_single_blocks_0_linear1") for k in keys)  # only layers present
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in keys
    theirs = fused_by_diffusers(FluxPipeline, model, tmp_path / "k.safetensors", text_encoder=clip)
    assert_same_weights(theirs[0], merged(model, lora), model, changed=len(lora))
    assert_same_weights(theirs[1], merged(clip, te_lora, "text_encoder"), clip, changed=len(te_lora))
    back, mine = _deltas(read_lora(tmp_path / "k.safetensors")), _deltas(lora | te_lora)
    assert back.keys() == mine.keys()  # add_k_proj, which the LoRA never trained, does not come back
    for k in mine:
        torch.testing.assert_close(back[k], mine[k], atol=1e-5, rtol=1e-6)


def _deltas(lora: dict) -> dict[str, torch.Tensor]:
    """Each layer's update applied to 8 fixed random inputs: equal maps give equal products, at a fraction of the
    memory of ``up @ down`` for Flux.1-dev's 12288 x 3072 layers."""
    probes: dict[int, torch.Tensor] = {}
    out = {}
    for k, (d, u) in lora.items():
        if d.shape[1] not in probes:
            g = torch.Generator().manual_seed(d.shape[1])
            probes[d.shape[1]] = torch.randn(d.shape[1], 8, generator=g, dtype=torch.float64)
        x = probes[d.shape[1]]
        out[k] = u.double() @ (d.double() @ x)
    return out


@pytest.mark.parametrize("ranks", [{}, {"attn.to_q": 2, "proj_mlp": 6}], ids=["equal", "mixed"])
@pytest.mark.parametrize("parts", [("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), ("attn.to_q", "attn.to_v")])
def test_flux_dev_sized_linear1_through_diffusers_converter(tmp_path, ranks, parts):
    """linear1 at Flux.1-dev's own widths (3072 x 3, 12288), which diffusers' converter hard-codes, without a model."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(0)
    lora = {}
    for p in parts:
        r = ranks.get(p, 4)
        lora[f"transformer.single_transformer_blocks.3.{p}"] = (
            torch.randn(r, 3072, generator=g), torch.randn(12288 if p == "proj_mlp" else 3072, r, generator=g))
    lora["transformer.norm_out.linear"] = (torch.randn(4, 3072, generator=g), torch.randn(6144, 4, generator=g))
    write_lora(lora, tmp_path / "k.safetensors", "kohya")
    converted = _convert_kohya_flux_lora_to_diffusers(dict(load_file(tmp_path / "k.safetensors")))
    theirs = {"transformer." + k.removeprefix("transformer.")[: -len(".lora_A.weight")]:
              (v, converted[k.replace("lora_A", "lora_B")]) for k, v in converted.items() if "lora_A" in k}
    mine, back = _deltas(lora), _deltas(read_lora(tmp_path / "k.safetensors"))
    assert back.keys() == mine.keys()  # a part the LoRA never trained does not come back
    for k in mine:
        torch.testing.assert_close(back[k], mine[k], atol=1e-5, rtol=1e-6)
    for k, delta in _deltas(theirs).items():  # diffusers gives absent parts zero LoRAs; trained ones must match
        torch.testing.assert_close(delta, mine.get(k, torch.zeros_like(delta)), atol=1e-5, rtol=1e-6)
    assert set(mine) <= set(theirs)


def test_flux_round_trip_keeps_every_delta_and_global_layers(tmp_path, cli):
    model = tiny_flux(guidance=True)
    targets = [t for t in flux_targets(model, glob=True) if not t.endswith("single_transformer_blocks.1.attn.to_k")]
    lora = peft_lora(model, "transformer", targets, rank_pattern={"transformer_blocks.1.attn.to_v": 2})
    write_lora(lora, tmp_path / "d.safetensors")
    code, out, err = cli("convert", "lora", tmp_path / "d.safetensors", tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 0, err
    keys = load_file(tmp_path / "k.safetensors").keys()
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in keys and "lora_unet_img_in.alpha" in keys
    assert not any(k.startswith("transformer.") for k in keys)
    code, out, err = cli("convert", "lora", tmp_path / "k.safetensors", tmp_path / "back.safetensors", "--to",
                         "diffusers")
    assert code == 0, err
    back = _deltas(read_lora(tmp_path / "back.safetensors"))
    assert back.keys() == lora.keys()
    for k, delta in _deltas(lora).items():
        torch.testing.assert_close(back[k], delta, atol=1e-5, rtol=1e-6)
    assert_same_weights(merged(model, read_lora(tmp_path / "k.safetensors")), merged(model, lora), model,
                        changed=len(lora))
    convert_lora(tmp_path / "k.safetensors", tmp_path / "k2.safetensors", "kohya")  # kohya -> kohya is stable
    a, b = load_file(tmp_path / "k.safetensors"), load_file(tmp_path / "k2.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_families_and_refusals(tmp_path):
    from diffusers import UNet2DConditionModel

    flux, sd3 = tiny_flux(), tiny_sd3()
    flux_lora = peft_lora(flux, "transformer", ["single_transformer_blocks.0.attn.to_q",
                                                "transformer_blocks.0.attn.to_q"])
    double_only = peft_lora(flux, "transformer", ["transformer_blocks.0.attn.to_k"])
    sd3_lora = peft_lora(sd3, "transformer", ["transformer_blocks.0.attn.to_q"])
    assert lora_family(flux_lora) == "flux" and lora_family(sd3_lora) == "sd3"
    assert lora_family({"unet.mid_block.attentions.0.proj_in": (torch.ones(1, 2), torch.ones(2, 1))}) == "unet"
    assert lora_family({"text_encoder.encoder.layers.0.self_attn.q_proj": (torch.ones(1, 2),
                                                                           torch.ones(2, 1))}) == "text_encoder"
    assert lora_family(double_only) == "sd3"  # Flux's double blocks share SD3's names: shapes decide on Flux
    merged(flux, double_only)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)
    for apply, model in ((lambda m: apply_lora_to(flux_lora, {"transformer": m}), "SD3"),
                         (lambda m: apply_lora(flux_lora, m, None), "UNet")):
        target = copy.deepcopy(sd3 if model == "SD3" else unet)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ConceptorError, match=f"trained for Flux.1 but the model is .*{model}") as err:
            apply(target)
        assert "\n" not in str(err.value)
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-merged
    with pytest.raises(ConceptorError, match="trained for SD3/SD3.5 but the model is a UNet"):
        apply_lora(sd3_lora, unet, None)
    with pytest.raises(ConceptorError, match="LoRA does not fit this model"):
        apply_lora_to(sd3_lora, {"transformer": flux})  # joint-block names, other widths


@pytest.mark.parametrize("keys,needle", [
    ({"lora_unet_double_blocks_0_img_attn_norm.lora_down.weight": torch.ones(2, 4),
      "lora_unet_double_blocks_0_img_attn_norm.lora_up.weight": torch.ones(4, 2)}, "not a Flux layer"),
    ({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.ones(2, 4),
      "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.ones(15, 2)}, "do not split"),
    ({"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": torch.ones(2, 4),
      "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": torch.ones(5, 2)}, "shift, scale"),
])
def test_odd_kohya_flux_files_are_named(tmp_path, keys, needle):
    from safetensors.torch import save_file

    save_file(keys, str(tmp_path / "o.safetensors"))
    with pytest.raises(ConceptorError, match=needle):
        read_lora(tmp_path / "o.safetensors")


def test_unknown_transformer_layer_is_refused_for_kohya(tmp_path):
    lora = {"transformer.single_transformer_blocks.0.attn.norm_q": (torch.ones(1, 4), torch.ones(4, 1))}
    with pytest.raises(ConceptorError, match="not a Flux layer kohya's layout names"):
        write_lora(lora, tmp_path / "k.safetensors", "kohya")

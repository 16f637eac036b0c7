"""A quantized frozen base under an fp32 LoRA: a tiny Flux transformer built in code is quantized (nf4/int8 by
bitsandbytes, fp8 by optimum-quanto, all on the CPU), adapted, and one backward reaches every LoRA weight."""
from __future__ import annotations

from importlib import metadata

import pytest
import torch

from conceptor.errors import ConceptorError
from conceptor.models import quantize as Q

PACKAGE_MODULE = {"bitsandbytes": "bitsandbytes", "optimum-quanto": "optimum.quanto"}


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=False,
                                  axes_dims_rope=(4, 6, 6)).to(torch.bfloat16)


def run(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, enc = torch.randn(1, 16, 16, generator=g), torch.randn(1, 8, 32, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    return model(hidden_states=x.bfloat16(), encoder_hidden_states=enc.bfloat16(), pooled_projections=pooled.bfloat16(),
                 timestep=torch.tensor([0.5], dtype=torch.bfloat16), img_ids=torch.zeros(16, 3),
                 txt_ids=torch.zeros(8, 3), return_dict=False)[0]


@pytest.mark.parametrize("mode", Q.MODES)
def test_lora_trains_on_a_quantized_base_on_the_cpu(mode):
    pytest.importorskip(PACKAGE_MODULE[Q.PACKAGES[mode]])
    from peft import LoraConfig

    model = tiny_flux()
    with torch.no_grad():
        reference = run(model).float()
    in_blocks = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear and "blocks." in name]
    assert not Q.is_quantized(model)
    assert Q.quantize_base(model, mode) == len(in_blocks) == 20 and Q.is_quantized(model)
    q = model.transformer_blocks[0].attn.to_q
    stored = getattr(q.weight, "_data", q.weight)  # quanto keeps the float8 bytes inside its tensor subclass
    assert stored.dtype == {"nf4": torch.uint8, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[mode]
    assert type(model.x_embedder) is torch.nn.Linear and model.x_embedder.weight.dtype == torch.bfloat16  # KEEP
    with torch.no_grad():
        out = run(model).float()
    assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.95

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]))
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in name for name in lora)
    for name, p in lora.items():
        p.data = p.data.float()  # as models/adapters.add_lora keeps them
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # B starts at zero; nonzero, the gradient reaches A too
    run(model).float().pow(2).mean().backward()
    for name, p in lora.items():
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, name
    assert not any(p.grad is not None for name, p in model.named_parameters() if "lora_" not in name)


def test_a_missing_package_is_one_line_naming_it(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(Q.metadata, "version", missing)
    with pytest.raises(ConceptorError, match=r"--quantize nf4 needs bitsandbytes: pip install 'bitsandbytes>="):
        Q.quantize_base(torch.nn.Sequential(torch.nn.Linear(4, 4)), "nf4")
    with pytest.raises(ConceptorError, match="needs optimum-quanto"):
        Q.quantize_base(torch.nn.Sequential(torch.nn.Linear(4, 4)), "fp8")


def test_quantizing_after_the_lora_or_an_unknown_mode_is_refused():
    from peft import LoraConfig

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConceptorError, match="choose one of nf4, int8, fp8"):
        Q.quantize_base(model, "int4")
    model = tiny_flux()
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ConceptorError, match="before adding LoRA"):
        Q.quantize_base(model, "nf4")


@pytest.mark.parametrize("mode", [None, *Q.MODES])
def test_the_memory_estimate_counts_the_bytes_the_quantizer_stores(mode):
    if mode:
        pytest.importorskip(PACKAGE_MODULE[Q.PACKAGES[mode]])
    from conceptor.training import memory as M

    config = {"patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 64,
              "num_attention_heads": 4, "joint_attention_dim": 256, "pooled_projection_dim": 64,
              "guidance_embeds": False, "axes_dims_rope": [8, 28, 28]}
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**config).to(torch.bfloat16)
    if mode:
        Q.quantize_base(model, mode)
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # with the quant states
    plan = M.TrainingPlan(quantize=mode, cache_text=True, cache_latents=True)
    estimate = M.estimate_memory(M.Architecture("flux", config), plan).weights
    assert abs(estimate - stored) / stored < 0.02, (estimate, stored)

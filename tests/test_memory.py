"""The training-memory estimate: full-size architectures counted on the meta device, the per-block activation
formula against what autograd really keeps, monotone answers, and the budget search."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conceptor.errors import ConceptorError
from conceptor.training import memory as M

FLUX = M.ARCHITECTURES["flux-dev"]
SD35M = M.ARCHITECTURES["sd3.5-medium"]
CACHED = M.TrainingPlan(dtype="bf16", rank=16, resolution=1024, gradient_checkpointing=True, cache_text=True,
                        cache_latents=True)


@pytest.mark.parametrize("name, part, public", [
    ("flux-dev", "transformer", 11.9e9),  # Black Forest Labs: "12B"; the diffusers checkpoint 11.90B
    ("sd3.5-large", "transformer", 8.1e9),
    ("sd3.5-medium", "transformer", 2.5e9),  # with its 384 x 384 position table, a stored buffer
    ("sd3-medium", "transformer", 2.0e9),
    ("flux-dev", "text_encoder_2", 4.76e9),  # T5-XXL encoder
    ("sd3.5-large", "text_encoder_2", 0.695e9),  # OpenCLIP bigG text tower with projection
    ("sd3.5-large", "text_encoder", 0.123e9),  # CLIP-L text
    ("flux-dev", "vae", 83.8e6),
])
def test_full_size_parameter_counts_match_the_public_figures(name, part, public):
    counted = M.parameter_counts(M.ARCHITECTURES[name])[part]
    assert abs(counted - public) / public < 0.05, f"{name} {part}: {counted / 1e9:.3f} B"


def test_flux_dev_lora_at_1024_lands_where_people_see_it():
    est = M.estimate_memory(FLUX, CACHED)
    assert 23.5 * M.GB < est.weights < 24.2 * M.GB  # the bf16 transformer alone is 23.8 GB
    assert 22 * M.GB < est.total < 30 * M.GB, M.format_estimate(est)
    nf4 = M.estimate_memory(FLUX, replace(CACHED, quantize="nf4"))
    assert nf4.total < 13 * M.GB, M.format_estimate(nf4)
    assert 0 < nf4.activations - est.activations < 0.2 * M.GB and nf4.trainable == est.trainable


@pytest.mark.parametrize("arch", [FLUX, SD35M], ids=["flux-dev", "sd3.5-medium"])
def test_the_estimate_moves_the_right_way_with_each_choice(arch):
    def total(**change):
        return M.estimate_memory(arch, replace(CACHED, **change)).total

    sizes = [total(resolution=r) for r in (256, 512, 768, 1024, 1536)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert total(resolution=(768, 1024)) < total(resolution=1024) < total(resolution=(1024, 1536))
    batches = [total(batch_size=b) for b in (1, 2, 4, 8)]
    assert batches == sorted(batches) and len(set(batches)) == len(batches)
    assert total() < total(gradient_checkpointing=False)
    assert total(quantize="nf4") < total(quantize="int8") < total()
    assert total(quantize="fp8") == total(quantize="int8")
    assert total() < total(cache_text=False) < total(cache_text=False, cache_latents=False)
    assert total(optimizer="adamw8bit") < total()
    assert total() < total(dtype="fp32") and total(dtype="fp16") == total()
    assert total() < total(rank=64) < total(training="full")
    assert total() < total(targets=tuple(arch_targets(arch)) + ("ff.net.0.proj", "ff.net.2"))


def arch_targets(arch):
    from conceptor.families import FAMILIES

    return FAMILIES[arch.family].lora_targets["attn"]


def test_plans_that_cannot_run_are_refused_in_one_line():
    with pytest.raises(ConceptorError, match="not full fine-tuning"):
        M.estimate_memory(FLUX, replace(CACHED, training="full", quantize="nf4"))
    with pytest.raises(ConceptorError, match="nf4, int8 or fp8"):
        M.estimate_memory(FLUX, replace(CACHED, quantize="q3"))
    with pytest.raises(ConceptorError, match="flow families"):
        M.estimate_memory(replace(FLUX, family="sdxl"), CACHED)


@pytest.mark.parametrize("budget_gb", [80, 40, 24, 16, 12, 10])
def test_the_flags_found_make_the_plan_fit(budget_gb):
    # as a run plans it: latents and frozen text are always cached (no flag), so no text encoder or VAE counts
    plan = M.TrainingPlan(dtype="fp32", batch_size=4, resolution=1024, cache_text=True, cache_latents=True)
    budget = budget_gb * M.GB
    fit = M.fit_budget(FLUX, plan, budget)
    assert fit.fits, fit.message
    applied = M.apply_flags(plan, fit.flags)
    assert applied == fit.plan and M.estimate_memory(FLUX, applied).total <= budget
    assert " ".join(fit.flags) in fit.message
    if not any(f.startswith("--resolution") for f in fit.flags):
        for dropped in fit.flags:  # smallest: no flag can be left out
            rest = [f for f in fit.flags if f != dropped]
            assert M.estimate_memory(FLUX, M.apply_flags(plan, rest)).total > budget, dropped


def test_a_lower_resolution_comes_last_and_nothing_is_not_a_fit():
    plan = replace(CACHED, quantize="nf4")
    fit = M.fit_budget(FLUX, plan, 9 * M.GB)
    assert fit.fits and fit.flags[-1].startswith("--resolution") and fit.plan.resolution < 1024
    assert M.fit_budget(FLUX, plan, 40 * M.GB).flags == ()
    no = M.fit_budget(FLUX, M.TrainingPlan(), 4 * M.GB)
    assert not no.fits and no.flags == () and "does not fit in 4.0 GB" in no.message


def test_format_estimate_is_one_line_per_part():
    est = M.estimate_memory(SD35M, CACHED)
    text = M.format_estimate(est, 8 * M.GB, "SD3.5-medium")
    lines = text.splitlines()
    assert lines[0] == "SD3.5-medium" and len(lines) == 8
    assert lines[-1].split()[:3] == ["total", f"{est.total / M.GB:.1f}", "GB"] and "fits in 8.0 GB" in lines[-1]
    assert M.apply_flags(CACHED, ["--mixed-precision no", "--resolution 512"]).dtype == "fp32"


# -- the activation formula against autograd's own count --------------------------------------------------
def saved_bytes(block, args, kwargs, exclude) -> int:
    """Bytes of the distinct storages autograd keeps for backward, less parameters and shared rotary tables."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(*args, **kwargs)
    return sum(kept.values())


ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@pytest.mark.parametrize("kind, dual", [("double", False), ("single", False), ("joint", False), ("joint", True)])
@pytest.mark.parametrize("dtype, training, targets", [
    (torch.bfloat16, "lora", ATTN), (torch.bfloat16, "lora", ATTN + ["ff.net.0.proj", "ff.net.2", "proj_mlp"]),
    (torch.float32, "lora", ATTN + ["proj_out", "ff.net.2"]), (torch.bfloat16, "full", None),
    (torch.float32, "full", None)])
def test_block_formula_matches_what_autograd_keeps(kind, dual, dtype, training, targets):
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers import transformer_flux as tf

    torch.manual_seed(0)
    width, heads, img, txt = 256, 2, 96, 32
    block = {"double": lambda: tf.FluxTransformerBlock(width, heads, width // heads),
             "single": lambda: tf.FluxSingleTransformerBlock(width, heads, width // heads),
             "joint": lambda: JointTransformerBlock(width, heads, width // heads, context_pre_only=False,
                                                    qk_norm="rms_norm", use_dual_attention=dual)}[kind]()
    lora_linears = []
    if training == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        block.requires_grad_(False)
        matched = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and M._matches(n, targets)]
        lora_linears = [(n, block.get_submodule(n).in_features) for n in matched]
        inject_adapter_in_model(LoraConfig(r=4, target_modules=targets), block)
    block = block.to(dtype)
    for name, p in block.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    x = torch.randn(1, img, width, dtype=dtype, requires_grad=True)
    c = torch.randn(1, txt, width, dtype=dtype, requires_grad=True)
    temb = torch.randn(1, width, dtype=dtype)
    kwargs, exclude = {}, list(block.parameters())
    if kind != "joint":
        kwargs["image_rotary_emb"] = tf.FluxPosEmbed(10000, [16, 56, 56])(torch.zeros(img + txt, 3))
        exclude += list(kwargs["image_rotary_emb"])
    counted = saved_bytes(block, (x, c, temb), kwargs, exclude)
    half = dtype != torch.float32
    lora = M.lora_input_bytes(kind, lora_linears, img, txt, 4, half)
    formula = M.block_bytes(kind, width, 4 * width, heads, img, txt, half=half, full=training == "full", dual=dual,
                            lora=lora)
    assert abs(formula - counted) / counted < 0.05, (formula, counted)

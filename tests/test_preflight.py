"""The memory check every SD3/Flux run makes before loading weights: printed on any machine, and on a GPU too
small for the run a one-line stop with the flags that fit. Full-size architectures come from configs alone."""
from __future__ import annotations

import json

import pytest

from conceptor.training import memory as M
from conceptor.training import preflight


def _config_only_folder(path, transformer, family):
    """A Flux.1-dev / SD3.5 folder with configs and no weights: the check must not need any."""
    parts = {"flux": {"text_encoder": M.CLIP_L_FLUX, "text_encoder_2": M.T5_XXL},
             "sd3": {"text_encoder": M.CLIP_L, "text_encoder_2": M.CLIP_G, "text_encoder_3": M.T5_XXL}}[family]
    index = {"_class_name": {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}[family],
             "transformer": ["diffusers", transformer["_class_name"]], "vae": ["diffusers", "AutoencoderKL"]}
    for name, config in {**parts, "transformer": transformer, "vae": M.VAE_16CH}.items():
        (path / name).mkdir(parents=True)
        (path / name / "config.json").write_text(json.dumps(config))
        index.setdefault(name, ["transformers", config.get("architectures", ["T5EncoderModel"])[0]])
    (path / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.mark.parametrize("flags, fits", [([], False), (["--mixed-precision", "bf16", "--gradient-checkpointing",
                                                         "--quantize", "nf4"], True)])
def test_flux_dev_on_a_24_gb_card_is_stopped_with_the_flags_that_fit(tmp_path, cli, concept_images, monkeypatch,
                                                                       flags, fits):
    model = _config_only_folder(tmp_path / "flux-dev", M.FLUX_DEV_TRANSFORMER, "flux")
    monkeypatch.setattr(preflight, "gpu_budget", lambda: 24e9)
    code, out, err = cli("train", "dreambooth", "--model", model, "--images", concept_images, "--instance-prompt",
                         "a sks toy", "--lora", "--rank", "16", "--steps", "1", "--output", tmp_path / "run", *flags)
    assert "estimated peak GPU memory (flux, 1024 px, batch 1, lora)" in err
    if fits:  # the estimate passes; loading the (absent) weights is what fails then, in one line
        assert code == 2 and "does not fit" not in err and "--quantize" not in err.splitlines()[-1]
    else:
        last = err.strip().splitlines()[-1]
        assert code == 2 and "GB of GPU memory and 24.0 GB are free; add " in last
        added = last.split("add ", 1)[1].split()
        arch, _ = preflight.read_architecture(str(model), None)
        plan = M.apply_flags(preflight.plan_of(_cfg(model, concept_images, tmp_path), arch), [" ".join(added)])
        assert M.estimate_memory(arch, plan).total <= 24e9  # the advice fits
    assert not (tmp_path / "run").exists()


def _cfg(model, images, tmp_path):
    from conceptor.config import build_config

    return build_config("dreambooth", None, {"model": {"model": str(model)}, "data": {"images": str(images)},
                                             "train": {"output": str(tmp_path / "run")},
                                             "dreambooth": {"instance_prompt": "a sks toy", "lora": True, "rank": 16}})


def test_the_estimate_reads_configs_only_and_knows_the_family(tmp_path, concept_images):
    sd35 = _config_only_folder(tmp_path / "sd35", M.SD35_MEDIUM_TRANSFORMER, "sd3")
    arch, side = preflight.read_architecture(str(sd35), None)
    assert arch.family == "sd3" and side == 1024 and len(arch.text_encoders) == 2  # CLIP-L, CLIP-G; T5 on the CPU
    est = preflight.check_memory(_cfg(sd35, concept_images, tmp_path))
    assert 4e9 < est.total < 40e9
    assert preflight.read_architecture(str(tmp_path / "missing"), None) is None


def test_unet_models_and_a_cpu_get_no_stop(tiny_sd1, tmp_path, concept_images, monkeypatch):
    assert preflight.read_architecture(str(tiny_sd1), None) is None
    monkeypatch.setattr(preflight, "gpu_budget", lambda: None)
    model = _config_only_folder(tmp_path / "flux-dev", M.FLUX_DEV_TRANSFORMER, "flux")
    assert preflight.check_memory(_cfg(model, concept_images, tmp_path)).total > 24e9  # printed, not refused

"""The installed set: the lock agrees with the pyproject ranges, a known-bad peft is one line (not a traceback
inside transformers), and plain diffusers code loads the bundled model in fp32 on the CPU."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conceptor import compat

ROOT = Path(__file__).resolve().parent.parent


def test_lock_pins_satisfy_the_pyproject_ranges():
    import tomllib
    from packaging.requirements import Requirement

    lock = {}
    path = Path(os.environ.get("CONCEPTOR_LOCK") or ROOT / "constraints.txt")  # tools/update_lock.py: its candidate
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            lock[name.lower().replace("_", "-")] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = req.name.lower().replace("_", "-")
        assert name in lock, f"{name} is a dependency but not pinned in constraints.txt"
        assert req.specifier.contains(lock[name], prereleases=True), f"lock {name}=={lock[name]} is outside {req}"


def test_tested_versions_read_from_a_lock(tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text("# header\nPEFT==0.21.2\ntransformers==5.23.0  # why\nnumpy==2.4.6\n")
    assert compat.tested_versions(("transformers", "peft"), lock) == {"peft": "0.21.2", "transformers": "5.23.0"}
    assert compat.tested_versions(("peft",), tmp_path / "missing.txt") == {}


def test_this_environment_can_train_adapters():
    assert compat.peft_problem() is None


def test_a_peft_the_libraries_refuse_is_one_line_before_any_work(monkeypatch, cli, tiny_sd1, concept_images,
                                                                    tmp_path):
    """transformers 5.24 + peft 0.21 raised deep inside add_adapter; now: which versions to install, exit 2."""
    import transformers.integrations.peft as tp

    monkeypatch.setattr(tp, "MIN_PEFT_VERSION", "99.0")
    out = tmp_path / "run"
    code, _, err = cli("train", "dreambooth", "--model", tiny_sd1, "--images", concept_images, "--instance-prompt",
                       "a photo of sks toy", "--lora", "--lora-text-encoder", "--steps", "1", "--output", out)
    assert code == 2
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in err
    assert "transformers" in line[0] and "needs peft >= 99.0" in line[0] and "pip install" in line[0]
    assert "'peft==" in line[0] and "'transformers==" in line[0]  # the tested set, read from the lock
    assert not out.exists()  # refused before the model loaded or a folder was made
    # The library path (models/adapters.add_lora) says the same, for Python callers.
    from conceptor.errors import ConceptorError
    from conceptor.models.adapters import add_lora
    from conceptor.models.load import load_components

    with pytest.raises(ConceptorError, match="needs peft >= 99.0"):
        add_lora(load_components(str(tiny_sd1)).text_encoder, 2, None, ["q_proj"], 0)


def test_plain_diffusers_loads_the_bundled_model_in_fp32():
    """The README's diffusers snippet, as a user writes it, without torch_dtype: the bundle's weights are fp16
    on disk, and every part must still come up fp32 on the CPU and generate."""
    from diffusers import StableDiffusionPipeline

    from conceptor.api import bundled_model_path

    pipe = StableDiffusionPipeline.from_pretrained(str(bundled_model_path()), safety_checker=None)
    assert {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {torch.float32}
    image = pipe("a photo of a object", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3) and image.std() > 0.01

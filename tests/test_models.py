"""Model loading: family and prediction type from the model, single-file checkpoints, clear refusals."""
from __future__ import annotations

import pytest
import torch

from conceptor.errors import ConceptorError
from conceptor.formats.ldm_checkpoint import save_single_file
from conceptor.models.load import load_components


@pytest.mark.parametrize("family,prediction", [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_folder_family_and_prediction_type(tiny_sd1, tiny_sd2, family, prediction):
    c = load_components(str(tiny_sd1 if family == "sd1" else tiny_sd2))
    assert (c.family, c.prediction_type) == (family, prediction)
    assert c.scheduler.config.prediction_type == prediction
    assert c.default_resolution == 32 and c.vae_scale_factor == 8


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_round_trip_is_exact(tiny_sd1, tiny_sd2, tmp_path, family):
    folder = tiny_sd1 if family == "sd1" else tiny_sd2
    c = load_components(str(folder))
    path = save_single_file(c.unet, c.vae, c.text_encoder, tmp_path / "model.safetensors", family)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys  # the LDM layout A1111 reads
    assert any(k.startswith("first_stage_model.encoder.down.0.block.0.") for k in keys)
    d = load_components(str(path), model_config=str(folder))
    assert (d.family, d.prediction_type) == (c.family, c.prediction_type)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(c, part).state_dict(), getattr(d, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_single_file_needs_configs(tiny_sd1, tmp_path):
    c = load_components(str(tiny_sd1))
    path = save_single_file(c.unet, c.vae, c.text_encoder, tmp_path / "m.safetensors", "sd1")
    with pytest.raises(ConceptorError, match="--model-config"):
        load_components(str(path))
    with pytest.raises(ConceptorError, match="m.safetensors"):  # family configs are not cached offline
        load_components(str(path), family="sd1")


def test_refusals(tmp_path):
    (tmp_path / "m.ckpt").write_bytes(b"not really")
    with pytest.raises(ConceptorError, match="pickle"):
        load_components(str(tmp_path / "m.ckpt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConceptorError, match="not a diffusers"):
        load_components(str(tmp_path / "folder"))
    with pytest.raises(ConceptorError, match="does not exist"):
        load_components(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConceptorError, match="does not exist"):
        load_components("./relative/missing")


def test_train_from_single_file(tiny_sd1, tmp_path, concept_images, cli):
    c = load_components(str(tiny_sd1))
    path = save_single_file(c.unet, c.vae, c.text_encoder, tmp_path / "m.safetensors", "sd1")
    code, _, err = cli("train", "textual-inversion", "--model", path, "--model-config", tiny_sd1,
                       "--images", concept_images, "--token", "<t>", "--init-token", "toy", "--steps", "2",
                       "--output", tmp_path / "run")
    assert code == 0, err
    assert (tmp_path / "run" / "learned_embeds.safetensors").is_file()


def test_a_models_own_guidance_default(tiny_sd1, tmp_path, cli):
    """conceptor.json in a model folder sets the default guidance; fine-tunes inherit it; a bad one is refused."""
    import json
    import shutil

    import numpy as np

    from conceptor import api
    from conceptor.config import ModelConfig
    from conceptor.models.save import save_pipeline

    assert api.load(None).components.default_guidance == 4.0  # the bundled model's, measured
    model = tmp_path / "m"
    shutil.copytree(tiny_sd1, model)
    assert load_components(str(model)).default_guidance == 7.5  # SD's, when the folder says nothing
    (model / "conceptor.json").write_text(json.dumps({"guidance": 2.0}))
    loaded = api.load(str(model))
    assert loaded.components.default_guidance == 2.0

    def pixels(**kw):
        return np.asarray(loaded.generate("a photo of a toy", steps=3, seed=3, **kw)[0], dtype=np.int16)

    assert np.array_equal(pixels(), pixels(guidance=2.0))
    assert not np.array_equal(pixels(), pixels(guidance=7.5))

    save_pipeline(loaded.components, tmp_path / "tuned", ModelConfig(model=str(model)), text_trained=False)
    assert json.loads((tmp_path / "tuned" / "conceptor.json").read_text()) == {"guidance": 2.0}
    assert load_components(str(tmp_path / "tuned")).default_guidance == 2.0

    (model / "conceptor.json").write_text('{"guidance": "lots"')
    code, out, err = cli("generate", "--model", model, "--prompt", "x", "--output", tmp_path / "img")
    assert code != 0 and "conceptor.json" in err and "Traceback" not in err
    assert not (tmp_path / "img").exists()

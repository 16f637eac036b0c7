"""The training levers of issue 25 beyond lr/batch/schedule: the Prodigy optimizer and a window of DDPM timesteps.
What they change, that the old behaviour is exactly what the defaults still do, and their bad input."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conceptor.config import build_config
from conceptor.training import diffusion as D
from conceptor.training.optim import param_groups

TOKEN = "<t>"


def _ti(tiny, images, out, *extra):
    return ["train", "textual-inversion", "--model", tiny, "--images", images, "--token", TOKEN, "--init-token",
            "toy", "--batch-size", "2", "--log-every", "1", "--output", out, *extra]


def test_default_window_is_the_old_uniform_draw_and_a_window_bounds_it():
    old = torch.randint(0, 1000, (500,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(D.sample_timesteps(500, 1000, torch.Generator().manual_seed(4)), old)
    t = D.sample_timesteps(500, 1000, torch.Generator().manual_seed(4), low=600, high=900)
    assert t.min() >= 600 and t.max() <= 899 and len(t.unique()) > 100


def test_the_unet_sees_only_timesteps_of_the_window(tiny_sd1, concept_images, tmp_path, cli, monkeypatch):
    from diffusers import UNet2DConditionModel

    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, timestep, *args, **kwargs):
        if torch.is_grad_enabled():  # training steps; the validation loss runs at fixed levels under no_grad
            seen.append(torch.as_tensor(timestep).flatten().clone())
        return forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    code, _, err = cli(*_ti(tiny_sd1, concept_images, tmp_path / "w", "--steps", "8", "--checkpoint-every", "0",
                            "--min-timestep", "700", "--max-timestep", "750"))
    assert code == 0, err
    t = torch.cat(seen)
    assert len(t) >= 16 and t.min() >= 700 and t.max() < 750


def test_prodigy_trains_resumes_exactly_and_defaults_its_lr_to_one(tiny_sd1, concept_images, tmp_path, cli):
    # a constant schedule: a cosine one depends on --steps, so a 3-step run would not be the first half of a 6-step one
    common = _ti(tiny_sd1, concept_images, tmp_path / "a", "--optimizer", "prodigy", "--checkpoint-every", "3",
                 "--lr-scheduler", "constant")
    assert cli(*common, "--steps", "6")[0] == 0
    saved = (tmp_path / "a" / "config.yaml").read_text()
    assert "optimizer: prodigy" in saved and "lr: 1.0" in saved
    b = [w if w != str(tmp_path / "a") else str(tmp_path / "b") for w in map(str, common)]
    assert cli(*b, "--steps", "3")[0] == 0
    code, _, err = cli(*b, "--steps", "6", "--resume", "latest")
    assert code == 0, err
    first = load_file(str(tmp_path / "a" / "learned_embeds-steps-3.safetensors"))[TOKEN]
    end_a = load_file(str(tmp_path / "a" / "learned_embeds.safetensors"))[TOKEN]
    end_b = load_file(str(tmp_path / "b" / "learned_embeds.safetensors"))[TOKEN]
    assert not torch.equal(first, end_a)  # it moved the vector
    assert torch.equal(end_a, end_b)  # Prodigy's step-size estimate is in the checkpoint: resume is exact


def test_prodigy_gives_every_group_the_one_lr(tmp_path):
    cfg = build_config("pivotal", None, {"data": {"images": str(tmp_path)}, "optim": {"optimizer": "prodigy"},
                                         "pivotal": {"token": TOKEN, "init_token": "toy"}})
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    groups = param_groups([{"params": [p], "lr": 5e-4}, {"params": [q]}], cfg, 1)
    assert [g["lr"] for g in groups] == [1.0, 1.0]
    cfg.optim.optimizer = "adamw"
    cfg.optim.lr = 1e-4
    assert [g["lr"] for g in param_groups([{"params": [p], "lr": 5e-4}, {"params": [q]}], cfg, 1)] == [5e-4, 1e-4]


@pytest.mark.parametrize(("extra", "says"), [
    (["--optimizer", "prodigy", "--use-8bit-adam"], "--use-8bit-adam is an AdamW"),
    (["--min-timestep", "500", "--max-timestep", "400"], "--max-timestep must be above --min-timestep (500)"),
    (["--max-timestep", "1200"], "must lie within"),
])
def test_bad_lever_values_are_one_line(extra, says, tiny_sd1, concept_images, tmp_path, cli):
    out = tmp_path / "bad"
    code, _, err = cli(*_ti(tiny_sd1, concept_images, out, "--steps", "2", *extra))
    assert code == 2 and says in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or says in err.strip().splitlines()[-1]
    assert not (out / "learned_embeds.safetensors").exists()


def test_a_flow_model_refuses_the_ddpm_window(tiny_sd3, concept_images, tmp_path, cli):
    code, _, err = cli("train", "textual-inversion", "--model", tiny_sd3, "--images", concept_images, "--token",
                       TOKEN, "--init-token", "toy", "--steps", "1", "--min-timestep", "100", "--output",
                       tmp_path / "f")
    assert code == 2 and "--timestep-sampling" in err


@pytest.mark.parametrize(("model", "extra", "window"), [
    ("tiny_sd1", [], 400),  # textual inversion of an object: DDPM timesteps 400-999
    ("tiny_sd1", ["--what", "style"], 0),  # a style keeps the low-noise steps that draw its textures
    ("tiny_sd1", ["--min-timestep", "0"], 0),  # the seeds' uniform draw, one flag away
    ("tiny_sd3", [], 0),  # flow matching draws its own noise levels: the DDPM window does not apply
])
def test_textual_inversions_window_follows_what_and_family(model, extra, window, request, concept_images, tmp_path,
                                                            cli):
    out = tmp_path / "run"
    code, _, err = cli("train", "textual-inversion", "--model", request.getfixturevalue(model), "--images",
                       concept_images, "--token", TOKEN, "--init-token", "toy", "--steps", "1", "--checkpoint-every",
                       "0", "--output", out, *extra)
    assert code == 0, err
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["min_timestep"] == window
    assert saved["train"]["batch_size"] == 4 and saved["optim"]["lr_scheduler"] == "cosine"
    assert saved["optim"]["lr"] == 5e-3

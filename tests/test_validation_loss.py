"""The validation loss: fixed noise levels and noise on fixed images, so the same weights give the same number
twice and a curve over steps compares like with like; logged beside the training loss and drawn on loss.png."""
from __future__ import annotations

import json

import pytest
import torch

from conceptor import api
from conceptor.config import build_config
from conceptor.methods import get_method
from conceptor.models.load import load_components
from conceptor.training.method import Shard


def _cfg(method, model, images, output, section, **train):
    data = {"images": str(images)} if method != "finetune" else {"dataset": str(images)}
    return build_config(method, None, {
        "model": {"model": str(model)}, "data": data, "optim": {"lr": 1e-2},
        "train": {"output": str(output), "steps": 4, "batch_size": 1, "log_every": 1, "checkpoint_every": 0,
                  **train},
        method.replace("-", "_"): section})


TI = {"token": "<t>", "init_token": "toy"}


def test_same_weights_same_number_and_training_moves_it(tiny_sd1, concept_images, tmp_path):
    cfg = _cfg("textual-inversion", tiny_sd1, concept_images, tmp_path / "run", TI)
    method = get_method("textual-inversion")
    method.setup(load_components(str(tiny_sd1)), cfg, torch.device("cpu"), Shard())
    first, again = method.validation_loss(), method.validation_loss()
    assert first == again and first > 0
    with torch.no_grad():
        method.embeddings[0].new[-1] += 0.5  # other vectors for the token: another number
    assert method.validation_loss() != first


@pytest.mark.parametrize("method, section", [
    ("textual-inversion", TI),
    ("dreambooth", {"instance_prompt": "a photo of sks toy", "lora": True, "rank": 2}),
])
def test_logged_at_start_every_n_and_end_and_drawn(tiny_sd1, concept_images, tmp_path, method, section):
    result = api.train(_cfg(method, tiny_sd1, concept_images, tmp_path / "run", section, validation_every=2))
    rows = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == [0, 2, 4] and all(v > 0 for v in val.values())
    assert sum("loss" in r for r in rows) == 4  # the training loss, every step, beside it
    assert (result.output / "loss.png").is_file()


def test_finetune_has_one_too(tiny_sd1, tmp_path):
    from PIL import Image

    folder = tmp_path / "ds"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a blue picture number {i}")
    result = api.train(_cfg("finetune", tiny_sd1, folder, tmp_path / "run", {"cache_dir": "none"}))
    rows = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 4]


def test_keep_best_keeps_the_best_steps_weights_and_says_which(tiny_sd1, concept_images, tmp_path, cli):
    from safetensors import safe_open

    from conceptor.formats.embeddings import read_embedding

    code, out, err = cli("train", "textual-inversion", "--model", tiny_sd1, "--images", concept_images,
                         "--token", "<t>", "--init-token", "toy", "--steps", "6", "--lr", "0.5",
                         "--eval-every", "1", "--keep-best", "val_loss", "--checkpoint-every", "1",
                         "--output", tmp_path / "run")
    assert code == 0, err
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["eval"]["val_loss"] for r in rows if "eval" in r}
    assert sorted(scores) == [1, 2, 3, 4, 5, 6]
    best_step = min(scores, key=scores.get)
    kept = json.loads((run / "best" / "best.json").read_text())
    assert kept == {"metric": "val_loss", "step": best_step, "score": scores[best_step]}
    assert f"kept step {best_step}" in out
    with safe_open(str(run / "checkpoints" / f"step-{best_step:06d}" / "trained.safetensors"), "pt") as f:
        want = f.get_tensor("vectors")
    assert torch.equal(read_embedding(run / "learned_embeds.safetensors").vectors, want)
    if best_step != 6:  # the last step's own file is kept beside it
        assert (run / "last" / "learned_embeds.safetensors").is_file()


def test_keep_best_needs_eval_every(cli, tiny_sd1, concept_images, tmp_path):
    code, _, err = cli("train", "textual-inversion", "--model", tiny_sd1, "--images", concept_images,
                       "--token", "<t>", "--init-token", "toy", "--keep-best", "fidelity", "--output", tmp_path / "o")
    assert code == 2 and "--eval-every" in err and not (tmp_path / "o").exists()


def test_tensorboard_gets_the_scalars_the_grid_and_the_config(tiny_sd1, concept_images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg("textual-inversion", tiny_sd1, concept_images, tmp_path / "run", TI, validation_every=2,
               log_with="tensorboard", validation_prompts=["a photo of a <t>"], validation_images=1,
               validation_sampling_steps=2)
    result = api.train(cfg)
    events = list((result.output / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("validation/loss")] == [0, 2, 4]
    assert {e.step for e in acc.Images("validation")} == {0, 2, 4}
    rows = [json.loads(x) for x in (result.output / "metrics.jsonl").read_text().splitlines()]
    assert acc.Scalars("train/loss")[-1].value == pytest.approx([r["loss"] for r in rows if "loss" in r][-1])
    hparams = [p for p in (result.output / "logs").rglob("*") if p.is_file()]
    assert len(hparams) >= 1 and "scalars" in tags


def test_a_missing_tracker_package_is_one_line(cli, tiny_sd1, concept_images, tmp_path):
    code, _, err = cli("train", "textual-inversion", "--model", tiny_sd1, "--images", concept_images,
                       "--token", "<t>", "--init-token", "toy", "--log-with", "wandb", "--output", tmp_path / "o")
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        assert code == 2 and "pip install wandb" in err and not (tmp_path / "o").exists()


def test_held_out_images_never_train_and_are_what_is_measured(tiny_sd1, concept_images, tmp_path):
    cfg = _cfg("textual-inversion", tiny_sd1, concept_images, tmp_path / "run", TI, steps=8)
    cfg.data.validation_split = 0.5
    method = get_method("textual-inversion")
    method.setup(load_components(str(tiny_sd1)), cfg, torch.device("cpu"), Shard())
    held = method.data.held_out
    assert len(held) == 2 and method.data.validation_items() == sorted(held)
    drawn = {i for m in range(40) for i in method.order(m)}
    assert drawn == set(range(4)) - held  # every other image trains, the held-out ones never
    assert method.validation_loss() == method.validation_loss()

"""The toy world is deterministic and keeps its secrets: unnamed shapes are never named, held-out never drawn."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conceptor.toyworld import world as W

TI_STEPS = 200


def test_same_seed_same_pixels_and_captions():
    a, b = W.dataset(3, 20), W.dataset(3, 20)
    assert [c for _, c in a] == [c for _, c in b]
    for (sa, _), (sb, _) in zip(a, b):
        assert np.array_equal(np.asarray(W.render(sa)), np.asarray(W.render(sb)))
    assert [c for _, c in W.dataset(4, 20)] != [c for _, c in a]


def test_unnamed_shapes_never_named_and_heldout_never_drawn():
    data = W.dataset(0, 2000)
    shapes = {s.shape for s, _ in data}
    assert set(W.UNNAMED_SHAPES) <= shapes  # drawn...
    assert not shapes & set(W.HELDOUT_SHAPES)
    assert not {(s.shape, s.color) for s, _ in data} & W.HELDOUT_COMBOS
    for spec, caption in data:
        words = caption.split()
        assert not set(words) & set(W.UNNAMED_SHAPES + W.HELDOUT_SHAPES)  # ...but never named
        if spec.shape in W.NAMED_SHAPES:
            assert spec.shape in words
    assert set(W.vocabulary()).isdisjoint(W.UNNAMED_SHAPES + W.HELDOUT_SHAPES)


def test_render_shows_the_shape_colour():
    spec = W.Spec("circle", "red", "white", "plain", 0.3, 0.5, 0.5, 0)
    px = np.asarray(W.render(spec))
    assert px.shape == (64, 64, 3)
    assert tuple(px[32, 32]) == W.COLORS["red"] and tuple(px[1, 1]) == W.BACKGROUND_COLORS["white"]
    masks = {s: np.asarray(W._mask(W.Spec(s, "red", "white", "plain", 0.3, 0.5, 0.5, 0), 64)) > 127
             for s in W.SHAPES}
    # Every shape is a different silhouette.
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (masks[a] != masks[b]).mean() > 0.02, (a, b)


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    """A 2+2-step run of the real pretraining recipe (EMA, min-SNR, fresh captions all on)."""
    from conceptor.toyworld.pretrain import RECIPE, pretrain

    tmp = tmp_path_factory.mktemp("toyworld")
    recipe = {**RECIPE, "images": 16, "vae_steps": 2, "vae_batch": 4, "unet_steps": 2, "unet_batch": 4,
              "warmup_steps": 1}
    pretrain(tmp / "model", recipe, tmp / "log.txt", save_every=2)
    return tmp


def test_pretrain_writes_a_loadable_sd_folder(smoke_model):
    """A real diffusers folder that the whole toolkit loads, with the recipe that made it beside it."""
    from conceptor import api

    log = (smoke_model / "log.txt").read_text()
    assert "unet 0" not in log and "done" in log
    recipe = json.loads((smoke_model / "model" / "recipe.json").read_text())
    assert recipe["unet_steps_done"] == 2 and recipe["seed"] == 0
    model = api.load(str(smoke_model / "model"))
    assert model.components.default_resolution == 64
    assert model.components.scheduler_config["clip_sample"] is False
    assert model.generate("a red circle", steps=2)[0].size == (64, 64)


def test_continue_onto_a_grown_vocabulary(smoke_model, tmp_path):
    """A model continued (--unet-init) after the world gained words keeps every trained weight: each old
    word keeps its own embedding row although ids shift, and old prompts encode exactly as before."""
    import tempfile

    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from conceptor.models.tiny import write_clip_tokenizer
    from conceptor.toyworld.pretrain import carry_text_encoder

    old_dir = smoke_model / "model"
    old = CLIPTextModel.from_pretrained(old_dir / "text_encoder")
    old_tok = CLIPTokenizer.from_pretrained(old_dir / "tokenizer")
    with tempfile.TemporaryDirectory() as d:
        size = write_clip_tokenizer(d, sorted(W.vocabulary() + ["angular", "bumpy"]))  # "angular" shifts ids
        new_tok = CLIPTokenizer.from_pretrained(d)
    cfg = old.config.to_dict() | {"vocab_size": size, "bos_token_id": size - 2, "eos_token_id": size - 1,
                                  "pad_token_id": size - 1}
    new = carry_text_encoder(old, old_tok.get_vocab(), CLIPTextModel(CLIPTextConfig(**cfg)), new_tok.get_vocab())
    assert new_tok.convert_tokens_to_ids("circle</w>") != old_tok.convert_tokens_to_ids("circle</w>")
    prompt = "a photo of a red circle on a blue striped background"
    with torch.no_grad():
        a = old(old_tok(prompt, return_tensors="pt").input_ids)[0]
        b = new(new_tok(prompt, return_tensors="pt").input_ids)[0]
    assert torch.equal(a, b)
    rows = new.get_input_embeddings().weight
    assert torch.allclose(rows[new_tok.convert_tokens_to_ids("bumpy</w>")],
                          old.get_input_embeddings().weight.mean(0))


def test_lr_schedule_and_min_snr_weight():
    import torch

    from conceptor.toyworld.pretrain import lr_at, min_snr_weight

    r = {"unet_lr": 1.0, "warmup_steps": 10, "unet_steps": 110, "lr_schedule": "cosine", "lr_floor": 0.1}
    assert lr_at(5, r) == 0.5 and lr_at(10, r) == 1.0 and abs(lr_at(110, r) - 0.1) < 1e-9
    assert lr_at(50, {"unet_lr": 3e-4, "unet_steps": 100}) == 3e-4  # old recipes: constant, no warmup
    w = min_snr_weight(torch.tensor([0.999, 0.5, 0.01]), 5.0)
    assert w[0] < 0.01 and w[1] == 1.0 and w[2] == 1.0  # only low-noise steps are down-weighted


def test_evaluate_model_table(smoke_model):
    """Seen and unseen splits, all rates in [0, 1]; unseen prompts are exactly the held-out combos."""
    from conceptor.toyworld.evaluate import evaluate_model, evaluate_vae, prompt_specs

    specs = prompt_specs(0)
    assert {(s.shape, s.color) for s in specs["unseen"]} == set(W.HELDOUT_COMBOS)
    assert not {(s.shape, s.color) for s in specs["seen"]} & W.HELDOUT_COMBOS
    assert all(s.shape in W.NAMED_SHAPES for v in specs.values() for s in v)
    table = evaluate_model(smoke_model / "model", n_per_prompt=1, steps=2, grid=smoke_model / "grid.png")
    for split in ("seen", "unseen"):
        assert set(table[split]) == {"shape", "color", "background", "pattern", "all_three"}
        assert all(0.0 <= v <= 1.0 for v in table[split].values())
    assert len(table["per_prompt"]) == len(specs["seen"]) + len(specs["unseen"])
    assert (smoke_model / "grid.png").is_file()
    vae = evaluate_vae(smoke_model / "model" / "vae", n=8)  # the ceiling a UNet on this VAE can reach
    assert {"shape", "color", "background", "pattern", "mae"} <= set(vae) and 0 <= vae["color"] <= 1


def test_evaluator_ships_and_reads_fresh_renders():
    """The bundled evaluator loads offline and names shape, colour and background of unseen renders."""
    import json
    import random

    from conceptor.toyworld.evaluator import FOLDER, load_evaluator

    evaluator = load_evaluator()
    rng = random.Random(2024)  # a seed neither training nor the recorded held-out score used
    specs = [W.random_spec(rng, shapes=W.SHAPES, exclude=frozenset()) for _ in range(200)]
    p = evaluator.predict([W.render(s) for s in specs])
    for key in ("shape", "color", "background", "pattern"):
        accuracy = np.mean([a == getattr(s, key) for a, s in zip(getattr(p, key), specs)])
        assert accuracy >= 0.95, (key, accuracy)
    assert p.features.shape == (200, 128)
    assert json.loads((FOLDER / "config.json").read_text())["held_out_accuracy"]["shape"] >= 0.95


def test_bundled_model_ti_raises_fidelity(tmp_path):
    """The shipped model loads offline, and a short textual inversion on the shipped concept, starting from
    the word "object", makes "a photo of a <concept>" draw that shape in that colour far more often."""
    from conceptor import api
    from conceptor.config import build_config
    from conceptor.eval.concept import fidelity
    from conceptor.toyworld.concept import COLOR, FOLDER, SHAPE, TEMPLATES
    from conceptor.toyworld.evaluator import load_evaluator

    model = api.bundled_model_path()
    assert model is not None, "the bundled toy model is missing from the package"
    cfg = build_config("textual-inversion", None, {
        "data": {"images": str(FOLDER)}, "optim": {"lr": 5e-3},
        "train": {"output": str(tmp_path / "run"), "steps": TI_STEPS, "batch_size": 8, "checkpoint_every": 0,
                  "snr_gamma": 5.0},
        "textual_inversion": {"token": "<c>", "init_token": "object", "templates": str(TEMPLATES)}})
    result = api.train(cfg)
    evaluator = load_evaluator()
    before = api.load(None).generate("a photo of a object", num_images=12, steps=15, seed=0)
    after = api.load(None, [result.output]).generate("a photo of a <c>", num_images=12, steps=15, seed=0)
    f_before, f_after = fidelity(evaluator, before, SHAPE, COLOR), fidelity(evaluator, after, SHAPE, COLOR)
    assert f_after >= f_before + 0.3 and f_after >= 0.5, (f_before, f_after)


def test_style_measure_reads_renders():
    """The fine-tune measure: held-out pairs come from the captions, the style from what the training images
    share, and renders score as what they are."""
    from dataclasses import replace

    from conceptor.eval.style import dataset_style, held_out_pairs, score
    from conceptor.toyworld.evaluator import load_evaluator

    captions = ["a photo of a red star", "a blue circle on a gray background", "a drawing of a green heart!"]
    pairs = held_out_pairs(captions, limit=100)
    assert len(pairs) == len(W.NAMED_SHAPES) * len(W.COLORS) - 3
    assert ("star", "red") not in pairs and ("circle", "blue") not in pairs and ("star", "blue") in pairs
    assert len(held_out_pairs(captions, seed=1)) == 14 and held_out_pairs(captions, seed=1) != held_out_pairs(
        captions, seed=2)

    evaluator = load_evaluator()
    specs = W.sample_specs(3, 40, shapes=W.NAMED_SHAPES)
    striped = [replace(s, background="black", pattern="striped") for s in specs]
    assert dataset_style(evaluator, [W.render(s) for s in striped]) == {"background": "black", "pattern": "striped"}
    mixed = striped[:20] + [replace(s, background="white", pattern="plain") for s in specs[20:]]
    assert dataset_style(evaluator, [W.render(s) for s in mixed]) == {}  # nothing shared by 90%: no style

    asked = [("star", "blue"), ("ring", "yellow")]
    drawn = [W.Spec(shape, color, "black", "striped", 0.3, 0.5, 0.5, 0) for shape, color in asked for _ in range(3)]
    style = {"background": "black", "pattern": "striped"}
    assert score(evaluator, [W.render(s) for s in drawn], asked, style) == {
        "shape": 1.0, "color": 1.0, "style": 1.0, "images": 6}
    off_style = [W.render(replace(s, background="white", pattern="dotted")) for s in drawn]
    wrong_colour = [W.render(replace(s, color="red")) for s in drawn]
    assert score(evaluator, off_style, asked, style)["style"] == 0.0
    assert score(evaluator, wrong_colour, asked, style)["color"] == 0.0


def test_bundled_model_finetune_adopts_a_style(cli, tmp_path):
    """Fine-tuning the shipped model on the toy style dataset (black striped backgrounds its captions never
    mention) draws prompts the dataset left out in that style, still with the asked shape, and
    ``conceptor eval`` says so, against the base model on the same seeds."""
    from conceptor.toyworld.style import write_style_dataset

    data = write_style_dataset(tmp_path / "style", 160)
    run = tmp_path / "run"
    code, _, err = cli("train", "finetune", "--dataset", data, "--steps", "100", "--batch-size", "16", "--lr", "2e-4",
                       "--noise-offset", "0.35", "--snr-gamma", "5", "--caption-dropout", "0.3",
                       "--cache-dir", tmp_path / "cache", "--checkpoint-every", "0", "--output", run)
    assert code == 0, err
    code, out, err = cli("eval", run, "--num-images", "4", "--steps", "15")
    assert code == 0, err
    scores = json.loads((run / "eval.json").read_text())
    assert scores["style"] == {"background": "black", "pattern": "striped"}
    assert len(scores["held_out_prompts"]) == 14 and "a photo of a red circle" in scores["held_out_prompts"]
    before, after = scores["base"], scores["finetuned"]
    assert before["style"] <= 0.3 and after["style"] >= 0.8, (before, after)
    assert after["shape"] >= 0.7 and after["never_drawn"]["style"] >= 0.8, after
    assert "never-drawn" in out and (run / "eval-finetuned.png").is_file() and (run / "eval-base.png").is_file()

"""The toy world is deterministic and keeps its secrets: unnamed shapes are never named, held-out never drawn."""
from __future__ import annotations

import numpy as np

from conceptor.toyworld import world as W


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


def test_pretrain_writes_a_loadable_sd_folder(tmp_path):
    """Smoke run of the pretraining recipe: a real diffusers folder that the whole toolkit loads."""
    from conceptor import api
    from conceptor.toyworld.pretrain import RECIPE, pretrain

    recipe = {**RECIPE, "images": 16, "vae_steps": 2, "vae_batch": 4, "unet_steps": 2, "unet_batch": 4}
    pretrain(tmp_path / "model", recipe, tmp_path / "log.txt", save_every=2)
    assert "unet 0" not in (tmp_path / "log.txt").read_text() and "done" in (tmp_path / "log.txt").read_text()
    model = api.load(str(tmp_path / "model"))
    assert model.components.default_resolution == 64
    assert model.components.scheduler_config["clip_sample"] is False
    assert model.generate("a red circle", steps=2)[0].size == (64, 64)


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

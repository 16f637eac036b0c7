"""Scores during training with real-model metrics (tiny CLIP and DINO built in code), and the metadata every file
a run writes carries (ModelSpec, kohya's ss_* keys, the base model's fingerprint, no path of this machine)."""
from __future__ import annotations

import json

from safetensors import safe_open

from conceptor.config import build_config
from conceptor.eval.during import train
from conceptor.models.tiny_vision import build_tiny_clip_folder, build_tiny_dino_folder


def test_clip_and_dino_every_n_steps_and_keep_best(tiny_sd1, concept_images, tmp_path):
    clip, dino = build_tiny_clip_folder(tmp_path / "clip"), build_tiny_dino_folder(tmp_path / "dino")
    cfg = build_config("textual-inversion", None, {
        "model": {"model": str(tiny_sd1)}, "data": {"images": str(concept_images)}, "optim": {"lr": 5e-2},
        "train": {"output": str(tmp_path / "run"), "steps": 4, "batch_size": 1, "checkpoint_every": 0,
                  "eval_every": 2, "eval_images": 2, "clip_model": str(clip), "dino_model": str(dino),
                  "keep_best": "clip_i"},
        "textual_inversion": {"token": "<t>", "init_token": "toy"}})
    result = train(cfg)
    rows = [json.loads(x) for x in (result.output / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval"] for r in rows if "eval" in r}
    assert sorted(evals) == [2, 4]
    for scores in evals.values():
        assert {"val_loss", "clip_t", "clip_i", "dino"} <= set(scores)
        assert -1 <= scores["clip_i"] <= 1 and -1 <= scores["dino"] <= 1
    kept = json.loads((result.output / "best" / "best.json").read_text())
    assert kept["metric"] == "clip_i" and kept["score"] == max(s["clip_i"] for s in evals.values())


def test_every_file_says_how_it_was_made_and_names_no_path(tiny_sd1, concept_images, tmp_path):
    from conceptor import api

    cfg = build_config("pivotal", None, {
        "model": {"model": str(tiny_sd1)}, "data": {"images": str(concept_images)},
        "train": {"output": str(tmp_path / "run"), "steps": 2, "batch_size": 1, "checkpoint_every": 0},
        "lora": {"rank": 2}, "pivotal": {"token": "<sks>", "init_token": "toy", "instance_prompt": "a photo of {}"}})
    result = api.train(cfg)
    for name in ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors", "sks.safetensors"):
        with safe_open(str(result.output / name), "pt") as f:
            meta = f.metadata()
        assert meta["modelspec.architecture"].startswith("stable-diffusion-v1/"), name
        assert meta["modelspec.trigger_phrase"] and meta["conceptor.base_model_hash"]
        assert meta["ss_steps"] == "2" and "ss_training_finished_at" in meta, name
        text = json.dumps(meta)
        assert str(tmp_path) not in text and "/tmp/" not in text, name  # names, never this machine's paths
    with safe_open(str(result.output / "sks.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and meta["modelspec.trigger_phrase"] == "<sks>"
    assert json.loads(meta["conceptor.config"])["method"] == "pivotal"

"""The CLI as users call it: demo, generate, help."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image


def test_demo_writes_report(cli, tmp_path):
    out = tmp_path / "demo"
    code, stdout, err = cli("demo", "--output", out, "--steps", "12")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["steps"] == 12
    if report["note"] is None:  # the bundled toy model: the report carries the evaluator's numbers
        for key in ("concept_fidelity_before", "concept_fidelity_after", "similarity_after", "editability_after"):
            assert 0.0 <= report[key] <= 1.0, key
    for name in ("before.png", "after.png", "report.html", "run/loss.png", "run/learned_embeds.safetensors",
                 "run/samples/step-000000.png", "run/samples/step-000012.png"):
        assert (out / name).is_file(), name
    assert "report" in stdout
    code, _, err = cli("demo", "--output", out, "--steps", "2")
    assert code == 2 and "--overwrite" in err


def test_generate_writes_reproducible_images(cli, tiny_sd1, tmp_path):
    args = ["generate", "--model", tiny_sd1, "--prompt", "a photo of a toy", "--num-images", "3", "--steps", "3",
            "--seed", "5"]
    code, out, err = cli(*args, "--output", tmp_path / "a")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["000-seed5.png", "001-seed6.png", "002-seed7.png", "generation.json", "grid.png"]
    assert Image.open(tmp_path / "a" / "grid.png").size == (96, 32)
    # Image i depends only on seed+i: one image at seed 6 equals the second of the batch.
    code, _, err = cli("generate", "--model", tiny_sd1, "--prompt", "a photo of a toy", "--steps", "3",
                       "--seed", "6", "--output", tmp_path / "b")
    assert code == 0, err
    a = np.asarray(Image.open(tmp_path / "a" / "001-seed6.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "b" / "000-seed6.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_generate_schedulers_and_size(cli, tiny_sd2, tmp_path):
    for scheduler in ("pndm", "euler", "euler-a", "dpm++"):
        code, _, err = cli("generate", "--model", tiny_sd2, "--prompt", "a cat", "--steps", "4", "--scheduler",
                           scheduler, "--width", "48", "--height", "32", "--output", tmp_path / scheduler)
        assert code == 0, (scheduler, err)
        assert Image.open(tmp_path / scheduler / "000-seed0.png").size == (48, 32)
    code, _, err = cli("generate", "--model", tiny_sd2, "--prompt", "a cat", "--width", "50",
                       "--output", tmp_path / "bad")
    assert code == 2 and "multiples of 8" in err
    code, _, err = cli("generate", "--model", tiny_sd2, "--prompt", "a cat", "--steps", "2", "--scheduler", "pndm",
                       "--output", tmp_path / "bad")
    assert code == 2 and "--steps 4" in err and not (tmp_path / "bad").exists()


def test_python_api_text_to_image(tiny_sd1):
    import conceptor

    sd = conceptor.load(str(tiny_sd1))
    images = sd.text_to_image("a photo of a cat", batch_size=2, num_steps=2, seed=3)
    assert len(images) == 2 and images[0].size == (32, 32)


def test_help_and_version(cli):
    code, out, _ = cli("--help")
    assert code == 0 and "train" in out and "generate" in out
    code, out, _ = cli("train", "textual-inversion", "--help")
    assert code == 0 and "--init-token" in out and "--resume" in out
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("conceptor ")


def test_eval_scores_a_run(cli, tiny_sd1, concept_images, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", "textual-inversion", "--model", tiny_sd1, "--images", concept_images, "--token",
                       "<c>", "--init-token", "toy", "--steps", "2", "--output", run)
    assert code == 0, err
    code, out, err = cli("eval", run, "--num-images", "4", "--steps", "2")
    assert code == 0, err
    scores = json.loads((run / "eval.json").read_text())
    for key in ("fidelity", "similarity", "editability"):
        assert key in scores and key in out
    assert 0 <= scores["fidelity"] <= 1 and 0 <= scores["editability"] <= 1
    assert (run / "eval-photos.png").is_file() and (run / "eval-edits.png").is_file()
    assert "only understands toy-world images" in err  # a random tiny model is not the toy world
    code, _, err = cli("eval", tmp_path)
    assert code == 2 and "not a run folder" in err

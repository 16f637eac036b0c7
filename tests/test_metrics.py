"""Real-model concept metrics (CLIP-T, CLIP-I, DINO, prior drift; DreamBooth sec. 4.1) on tiny CLIP/DINO folders
built in code and read through from_pretrained, as real ones are; and `conceptor eval --clip-model/--dino-model`."""
from __future__ import annotations

import json

import pytest
from PIL import Image, ImageDraw

from conceptor.errors import ConceptorError
from conceptor.eval import metrics as M


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from conceptor.models.tiny_vision import build_tiny_clip_folder, build_tiny_dino_folder

    root = tmp_path_factory.mktemp("vision")
    return build_tiny_clip_folder(root / "clip"), build_tiny_dino_folder(root / "dino")


@pytest.fixture(scope="module")
def models(folders):
    return M.load_clip(folders[0], device="cpu"), M.load_dino(folders[1], device="cpu")


def picture(color, shape="ellipse", size=48) -> Image.Image:
    im = Image.new("RGB", (size, size), (240, 240, 240))
    getattr(ImageDraw.Draw(im), shape)([8, 8, 40, 40], fill=color)
    return im


RED, BLUE, GREEN = picture((220, 30, 30)), picture((30, 40, 220), "rectangle"), picture((30, 200, 60), "rectangle")


def test_same_images_score_one_and_different_images_less(models):
    clip, dino = models
    for score in (M.clip_i, M.dino):
        model = clip if score is M.clip_i else dino
        same = score(model, [RED, RED.copy()], [RED])
        assert same == pytest.approx(1.0, abs=1e-5)
        mixed = score(model, [RED, BLUE], [RED])  # half the generated images are the reference
        other = score(model, [BLUE, GREEN], [RED])
        assert same > mixed > other and -1 <= other < 0.999
        # mean pairwise cosine: the mixed set is exactly the average of its two one-image scores
        assert mixed == pytest.approx((same + score(model, [BLUE], [RED])) / 2, abs=1e-5)
    assert M.prior_drift(dino, [RED, BLUE], [RED, BLUE]) == pytest.approx(0.0, abs=1e-5)
    assert M.prior_drift(clip, [RED, BLUE], [BLUE, RED]) == pytest.approx(1 - M.clip_i(clip, [RED], [BLUE]), abs=1e-5)


def test_scores_are_deterministic_and_batch_independent(models, folders, monkeypatch):
    clip, dino = models
    images = [RED, BLUE, GREEN, RED]
    first = (M.clip_t(clip, images, "a red dog"), M.clip_i(clip, images, [BLUE]), M.dino(dino, images, [GREEN]))
    assert first == (M.clip_t(clip, images, "a red dog"), M.clip_i(clip, images, [BLUE]),
                     M.dino(dino, images, [GREEN]))  # twice: the very same floats
    again = M.load_clip(folders[0], device="cpu"), M.load_dino(folders[1], device="cpu")  # reloaded from disk
    monkeypatch.setattr(M, "BATCH", 3)  # split across batches differently: the same numbers up to float rounding
    second = (M.clip_t(again[0], images, "a red dog"), M.clip_i(again[0], images, [BLUE]),
              M.dino(again[1], images, [GREEN]))
    assert first == pytest.approx(second, abs=1e-6)


def test_clip_t_responds_to_the_prompt(models):
    clip, _ = models
    a, b = M.clip_t(clip, [RED], ["a photo of a dog"]), M.clip_t(clip, [RED], ["red cat on the beach"])
    assert abs(a - b) > 1e-3 and -1 <= a <= 1 and -1 <= b <= 1
    # one prompt per image: the mean of the per-image scores
    pair = M.clip_t(clip, [RED, BLUE], ["a photo of a dog", "red cat on the beach"])
    assert pair == pytest.approx((a + M.clip_t(clip, [BLUE], ["red cat on the beach"])) / 2, abs=1e-5)
    with pytest.raises(ConceptorError, match="one prompt per image"):
        M.clip_t(clip, [RED, BLUE, GREEN], ["a", "b"])


def test_concept_metrics_generates_per_prompt_and_measures_drift(models):
    clip, dino = models
    calls = []

    def generate(prompt, n, seed):
        calls.append((prompt, n, seed))
        return [RED] * n

    out = M.concept_metrics(generate, ["a red toy", "a toy"], [RED], clip=clip, dino=dino, class_prompt="a toy",
                            base_generate=lambda p, n, s: [BLUE] * n, n=3, seed=5)
    assert calls == [("a red toy", 3, 5), ("a toy", 3, 1005), ("a toy", 3, 77_005)]
    assert out["clip_i"] == pytest.approx(1.0, abs=1e-4) and out["dino"] == pytest.approx(1.0, abs=1e-4)
    assert out["clip_t"] == pytest.approx(round((M.clip_t(clip, [RED], "a red toy") + M.clip_t(clip, [RED], "a toy"))
                                                / 2, 4), abs=1e-4)
    assert out["prior_drift"] == pytest.approx(round(1 - M.dino(dino, [RED], [BLUE]), 4), abs=1e-4)
    assert out["prior_drift_model"] == "dino"
    only_dino = M.concept_metrics(generate, ["a toy"], [BLUE], dino=dino, n=1)
    assert set(only_dino) == {"dino"}
    with pytest.raises(ConceptorError, match="need a CLIP or a DINO"):
        M.concept_metrics(generate, ["a toy"], [RED])


def test_missing_or_wrong_model_is_one_line(folders, tmp_path, cli):
    with pytest.raises(ConceptorError) as e:
        M.load_clip("nobody/no-such-clip")
    assert str(e.value) == ("CLIP model nobody/no-such-clip is not on this machine (not a folder, not in the hub "
                            "cache); download it once with `huggingface-cli download nobody/no-such-clip` or pass "
                            "--clip-model FOLDER")
    for load, flag in ((M.load_dino, "--dino-model"), (M.load_clip, "--clip-model")):
        with pytest.raises(ConceptorError, match=f"does not exist; pass an existing folder to {flag}") as e:
            load(tmp_path / "nothing-here")
        assert "\n" not in str(e.value)
    with pytest.raises(ConceptorError, match="holds a clip model, not a DINO one") as e:
        M.load_dino(folders[0])
    assert "\n" not in str(e.value)
    (tmp_path / "run").mkdir()
    code, out, err = cli("eval", tmp_path / "run", "--clip-model", "nobody/no-such-clip")
    assert code == 2 and err.strip().count("\n") == 0 and "not a run folder" in err


def test_cli_eval_prints_real_metrics_for_a_dreambooth_run(tiny_sd1, concept_images, folders, tmp_path, cli):
    from conceptor import api
    from conceptor.config import build_config

    run = tmp_path / "run"
    api.train(build_config("dreambooth", None, {
        "model": {"model": str(tiny_sd1)}, "data": {"images": str(concept_images)}, "optim": {"lr": 0.05},
        "train": {"output": str(run), "steps": 2, "batch_size": 1, "checkpoint_every": 0},
        "dreambooth": {"instance_prompt": "a photo of sks toy", "lora": True, "rank": 2,
                       "class_prompt": "a photo of a toy", "num_class_images": 1, "class_sampling_steps": 1}}))
    clip, dino = folders
    code, out, err = cli("eval", run, "--clip-model", clip, "--dino-model", dino, "--num-images", "2", "--steps", "4")
    assert code == 0, err
    scores = json.loads((run / "eval-metrics.json").read_text())
    assert scores["method"] == "dreambooth" and scores["subject"] == "sks toy"
    assert scores["prompts"] == 25 and scores["images_per_prompt"] == 1 and scores["prior_drift_model"] == "dino"
    for key in ("clip_t", "clip_i", "dino", "prior_drift"):
        assert -1 <= scores[key] <= 2 and f"{key}: {scores[key]:.4f}" in out
    # the LoRA moved the class images away from the base model's on the same seeds, and the toy path did not run
    assert 1e-4 < scores["prior_drift"] <= 2 and not (run / "eval.json").exists()
    # the same run again: the same numbers (seeded sampling, deterministic metrics)
    code, out2, err = cli("eval", run, "--clip-model", clip, "--dino-model", dino, "--num-images", "2",
                          "--steps", "4")
    assert code == 0 and out2 == out

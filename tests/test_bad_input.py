"""Every bad input gets one line on stderr, exit code 2, no traceback and no output written."""
from __future__ import annotations

import pytest

TOKEN = "<cat-toy>"


def ti_args(model, images, out, *extra):
    return ["train", "textual-inversion", "--model", model, "--images", images, "--token", TOKEN,
            "--init-token", "toy", "--steps", "2", "--output", out, *extra]


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_image_folder(cli, tiny_sd1, tmp_path):
    code, _, err = cli(*ti_args(tiny_sd1, tmp_path / "nope", tmp_path / "out"))
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "out" / "learned_embeds.safetensors").exists()


def test_empty_image_folder_and_non_images(cli, tiny_sd1, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.md").write_text("hi")
    code, _, err = cli(*ti_args(tiny_sd1, tmp_path / "imgs", tmp_path / "out"))
    assert_one_line_error(code, err, "no images")
    assert "notes.md" in err  # the skipped file is named in a warning


def test_corrupt_image_names_the_file(cli, tiny_sd1, concept_images, tmp_path):
    good = (concept_images / "0.png").read_bytes()
    (concept_images / "broken.png").write_bytes(good[: len(good) // 2])
    code, _, err = cli(*ti_args(tiny_sd1, concept_images, tmp_path / "out"))
    assert_one_line_error(code, err, "broken.png")


@pytest.mark.parametrize("token,needle", [("cat", "<cat>"), ("a photo", "one word")])
def test_token_already_known(cli, tiny_sd1, concept_images, tmp_path, token, needle):
    args = ti_args(tiny_sd1, concept_images, tmp_path / "out")
    args[args.index(TOKEN)] = token
    code, _, err = cli(*args)
    assert_one_line_error(code, err, needle)


def test_blank_initializer(cli, tiny_sd1, concept_images, tmp_path):
    args = ti_args(tiny_sd1, concept_images, tmp_path / "out")
    args[args.index("toy")] = "   "  # several words or pieces are averaged; no token at all has nothing to average
    code, _, err = cli(*args)
    assert_one_line_error(code, err, "initializer", "empty")


def test_resolution_not_multiple_of_8(cli, tiny_sd1, concept_images, tmp_path):
    code, _, err = cli(*ti_args(tiny_sd1, concept_images, tmp_path / "out", "--resolution", "30"))
    assert_one_line_error(code, err, "multiple of 8")


def test_missing_model_path(cli, concept_images, tmp_path):
    code, _, err = cli(*ti_args(tmp_path / "no-model", concept_images, tmp_path / "out"))
    assert_one_line_error(code, err, "does not exist")


def test_hub_id_offline_is_a_clear_error(cli, concept_images, tmp_path):
    code, _, err = cli(*ti_args("nobody/not-a-model", concept_images, tmp_path / "out"))
    assert_one_line_error(code, err, "nobody/not-a-model")


def test_existing_output_from_another_run(cli, tiny_sd1, concept_images, tmp_path):
    out = tmp_path / "out"
    assert cli(*ti_args(tiny_sd1, concept_images, out))[0] == 0
    before = (out / "learned_embeds.safetensors").read_bytes()
    code, _, err = cli(*ti_args(tiny_sd1, concept_images, out))
    assert_one_line_error(code, err, "--resume", "--overwrite")
    assert (out / "learned_embeds.safetensors").read_bytes() == before
    assert cli(*ti_args(tiny_sd1, concept_images, out, "--overwrite"))[0] == 0


def test_output_not_ours_is_never_deleted(cli, tiny_sd1, concept_images, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    code, _, err = cli(*ti_args(tiny_sd1, concept_images, out, "--overwrite"))
    assert_one_line_error(code, err, "not a conceptor run")
    assert (out / "thesis.tex").read_text() == "precious"


def test_junk_embedding_file(cli, tiny_sd1, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00garbage" * 10)
    code, _, err = cli("generate", "--model", tiny_sd1, "--prompt", "a toy", "--embedding", junk,
                       "--output", tmp_path / "gen")
    assert_one_line_error(code, err, "junk.safetensors")
    assert not (tmp_path / "gen").exists()


def test_wrong_width_embedding(cli, tiny_sd1, tmp_path):
    import torch

    from conceptor.formats.embeddings import Embedding, write_embedding

    path = tmp_path / "wide.safetensors"
    write_embedding(Embedding("<wide>", torch.randn(1, 768)), path, "diffusers")
    code, _, err = cli("generate", "--model", tiny_sd1, "--prompt", "a <wide>", "--embedding", path,
                       "--output", tmp_path / "gen")
    assert_one_line_error(code, err, "768", "32")


def test_bad_flags(cli, tmp_path):
    code, _, err = cli("train", "textual-inversion", "--steps", "many")
    assert_one_line_error(code, err, "--steps")
    code, _, err = cli("generate", "--prompt", "x", "--scheduler", "magic")
    assert_one_line_error(code, err, "magic")


def test_config_unknown_key(cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  stepz: 3\n")
    code, _, err = cli("train", "textual-inversion", "--config", cfg)
    assert_one_line_error(code, err, "stepz")


def test_resume_unknown_checkpoint(cli, tiny_sd1, concept_images, tmp_path):
    code, _, err = cli(*ti_args(tiny_sd1, concept_images, tmp_path / "out", "--resume", tmp_path / "nothing"))
    assert_one_line_error(code, err, "not a checkpoint")


def test_fp16_on_cpu_is_refused_with_the_alternative(cli, tiny_sd1, concept_images, tmp_path):
    code, _, err = cli(*ti_args(tiny_sd1, concept_images, tmp_path / "out", "--mixed-precision", "fp16"))
    assert_one_line_error(code, err, "bf16")


def test_second_run_on_a_locked_folder_is_refused_and_stale_locks_are_taken(tiny_sd1, concept_images, tmp_path, cli):
    import json
    import os
    import socket
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".conceptor.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        args = ["train", "textual-inversion", "--model", tiny_sd1, "--images", concept_images, "--token", "<t>",
                "--init-token", "toy", "--steps", "1", "--output", out]
        code, _, err = cli(*args)
        assert code == 2 and f"in use by another conceptor run (pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    code, _, err = cli(*args)  # the holder is gone: its lock is stale
    assert code == 0, err
    assert "stale lock" in err and not (out / ".conceptor.lock").exists()
    assert os.path.isfile(out / "learned_embeds.safetensors")

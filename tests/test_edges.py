"""Values at the edges: wrong types in config files, zero/negative/NaN numbers, seeds past what torch takes,
sizes no machine holds, a placeholder past the 77-token limit. Each is one `error:` line, exit code 2, no
traceback and nothing written, through the real CLI on tiny models."""
from __future__ import annotations

import pytest

from conceptor.config import MAX_TRAIN_SEED
from conceptor.sampling.pipeline import MAX_SEED

TOKEN = "<t>"
LONG = " ".join(["toy"] * 80)  # 80 tokens of the tiny tokenizer: the text alone passes the 77-token limit


def ti(model, images, out, *extra):
    return ["train", "textual-inversion", "--model", model, "--images", images, "--token", TOKEN, "--init-token",
            "toy", "--output", out, *extra]


def one_error_line(code, err, *needles) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def nothing_written(out) -> bool:
    """The run folder is created when training starts (to hold its lock); a refused run leaves it empty."""
    return not out.exists() or not any(out.iterdir())


# -- 1. config files with values of the wrong type -------------------------------------------------
@pytest.mark.parametrize("name,text,line", [
    ("c.yaml", "train:\n  steps: ten\n", "config file: train.steps must be a whole number, got 'ten'"),
    ("c.yaml", "train:\n  batch_size: 1.5\n", "config file: train.batch_size must be a whole number or null, got 1.5"),
    ("c.yaml", "train:\n  steps: 3.0\n", "config file: train.steps must be a whole number, got 3.0"),
    ("c.yaml", "train:\n  steps: true\n", "config file: train.steps must be a whole number, got true"),
    ("c.yaml", "train:\n  overwrite: 'yes'\n", "config file: train.overwrite must be true or false, got 'yes'"),
    ("c.yaml", "train:\n  validation_prompts: a\n",
     "config file: train.validation_prompts must be a list of strings, got 'a'"),
    ("c.yaml", "train:\n  validation_prompts: [a, 1]\n",
     "config file: train.validation_prompts must be a list of strings, got ['a', 1]"),
    ("c.yaml", "optim:\n  lr: [1]\n", "config file: optim.lr must be a number or null, got [1]"),
    ("c.yaml", "train:\n  seed: {a: 1}\n", "config file: train.seed must be a whole number, got {'a': 1}"),
    ("c.yaml", "train:\n  steps: null\n", "config file: train.steps must be a whole number, got null"),
    ("c.yaml", "data:\n  resolution: big\n", "config file: data.resolution must be a whole number or null, got 'big'"),
    ("c.yaml", "textual_inversion:\n  vectors: '2'\n",
     "config file: textual_inversion.vectors must be a whole number, got '2'"),
    ("c.toml", "[train]\nsteps = \"ten\"\n", "config file: train.steps must be a whole number, got 'ten'"),
    ("c.yaml", "train: 5\n", "config section 'train' must be a mapping of key: value"),
    ("c.yaml", "- train\n", "must hold sections like 'train:' and 'optim:'"),
])
def test_config_file_value_of_the_wrong_type(cli, tiny_sd1, concept_images, tmp_path, name, text, line):
    config = tmp_path / name
    config.write_text(text)
    code, _, err = cli(*ti(tiny_sd1, concept_images, tmp_path / "run", "--config", config))
    assert one_error_line(code, err, line)
    assert not (tmp_path / "run").exists()


def test_config_file_values_of_the_right_type_still_load(cli, tiny_sd1, concept_images, tmp_path):
    config = tmp_path / "c.yaml"  # a float field takes an int; X | None takes null
    config.write_text("optim:\n  lr: 1\n  max_grad_norm: null\ndata:\n  resolution: null\ntrain:\n  steps: 1\n")
    code, _, err = cli(*ti(tiny_sd1, concept_images, tmp_path / "run", "--config", config))
    assert code == 0, err


# -- 2. numbers at the edges of training ---------------------------------------------------------------
TI_EDGES = [
    (["--log-every", "0"], None, "--log-every must be at least 1"),
    (["--validation-images", "0"], None, "--validation-images must be at least 1"),
    ([], "train:\n  validation_sampling_steps: 0\n", "train.validation_sampling_steps must be at least 1"),
    (["--seed", "-1"], None, f"--seed must be between 0 and {MAX_TRAIN_SEED}, got -1"),
    (["--seed", str(2**63)], None, f"--seed must be between 0 and {MAX_TRAIN_SEED}, got {2**63}"),
    (["--seed", str(MAX_TRAIN_SEED + 1)], None, "--seed must be between 0"),
    (["--max-grad-norm", "nan"], None, "--max-grad-norm must be a finite number, got nan"),
    (["--max-grad-norm", "0"], None, "--max-grad-norm must be positive"),
    (["--max-grad-norm", "-1"], None, "--max-grad-norm must be positive"),
    (["--lr", "inf"], None, "--lr must be a finite number, got inf"),
    (["--weight-decay", "nan"], None, "--weight-decay must be a finite number, got nan"),
    (["--weight-decay", "-0.1"], None, "--weight-decay must be >= 0"),
    (["--snr-gamma", "nan"], None, "--snr-gamma must be a finite number, got nan"),
    (["--noise-offset", "inf"], None, "--noise-offset must be a finite number, got inf"),
    (["--flip-p", "nan"], None, "--flip-p must be a finite number, got nan"),
    (["--ema-decay=-inf"], None, "--ema-decay must be a finite number, got -inf"),
    ([], "optim:\n  adam_epsilon: .nan\n", "optim.adam_epsilon must be a finite number, got nan"),
    ([], "optim:\n  adam_epsilon: 0\n", "optim.adam_epsilon must be positive"),
    ([], "optim:\n  adam_beta1: 1.0\n", "optim.adam_beta1 and adam_beta2 must be in [0, 1)"),
    ([], "optim:\n  adam_beta2: .inf\n", "optim.adam_beta2 must be a finite number, got inf"),
]
DB_EDGES = [
    (["--class-prompt", "a toy", "--num-class-images", "0"], "--num-class-images must be at least 1"),
    (["--class-prompt", "a toy", "--class-sampling-steps", "0"], "--class-sampling-steps must be at least 1"),
    (["--class-prompt", "a toy", "--class-guidance", "nan"], "--class-guidance must be a finite number, got nan"),
    (["--prior-loss-weight", "inf"], "--prior-loss-weight must be a finite number, got inf"),
    (["--train-text-encoder", "--text-encoder-lr", "nan"], "--text-encoder-lr must be a finite number, got nan"),
    (["--lora", "--alpha", "inf"], "--alpha must be a finite number, got inf"),
]
FT_EDGES = [
    (["--caption-dropout", "nan"], "--caption-dropout must be a finite number, got nan"),
    (["--lora", "--alpha", "nan"], "--alpha must be a finite number, got nan"),
    (["--lora", "--alpha", "0"], "--alpha must be positive"),
]


@pytest.mark.parametrize("extra,config,line", TI_EDGES, ids=[" ".join(e) or c.split(":")[1] for e, c, _ in TI_EDGES])
def test_training_numbers_at_the_edges(cli, tiny_sd1, concept_images, tmp_path, extra, config, line):
    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
        extra = [*extra, "--config", tmp_path / "c.yaml"]
    code, _, err = cli(*ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "1", *extra))
    assert one_error_line(code, err, line)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,line", DB_EDGES, ids=[" ".join(e) for e, _ in DB_EDGES])
def test_dreambooth_numbers_at_the_edges(cli, tiny_sd1, concept_images, tmp_path, extra, line):
    code, _, err = cli("train", "dreambooth", "--model", tiny_sd1, "--images", concept_images, "--instance-prompt",
                       "a photo of sks toy", "--steps", "1", "--output", tmp_path / "run", *extra)
    assert one_error_line(code, err, line)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,line", FT_EDGES, ids=[" ".join(e) for e, _ in FT_EDGES])
def test_finetune_numbers_at_the_edges(cli, tiny_sd1, concept_images, tmp_path, extra, line):
    code, _, err = cli("train", "finetune", "--model", tiny_sd1, "--dataset", concept_images, "--steps", "1",
                       "--output", tmp_path / "run", *extra)
    assert one_error_line(code, err, line)
    assert not (tmp_path / "run").exists()


def test_the_largest_training_seed_trains(cli, tiny_sd1, concept_images, tmp_path):
    # seed * 1_000_003 + epoch seeds the data order (data/order.py); seed + 1 the class-image stream.
    code, _, err = cli("train", "dreambooth", "--model", tiny_sd1, "--images", concept_images, "--instance-prompt",
                       "a photo of sks toy", "--class-prompt", "a photo of a toy", "--num-class-images", "1",
                       "--class-sampling-steps", "1", "--lora", "--steps", "2", "--resolution", "32",
                       "--seed", str(MAX_TRAIN_SEED), "--output", tmp_path / "run")
    assert code == 0, err


# -- 3. generate: bad numbers, before the model loads -----------------------------------------------------
GENERATE_EDGES = [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "-2"], "--batch-size must be at least 1, got -2"),
    (["--num-images", "0"], "--num-images must be at least 1, got 0"),
    (["--width", "0"], "--width/--height must be positive multiples of 8 (e.g. 512), got --width 0"),
    (["--height", "-8"], "--width/--height must be positive multiples of 8 (e.g. 512), got --height -8"),
    (["--width", "50"], "--width/--height must be positive multiples of 8 (e.g. 512), got --width 50"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["--seed", "-1"], f"--seed must be a whole number between 0 and {MAX_SEED}, got -1"),
    (["--seed", str(2**63)], f"--seed must be a whole number between 0 and {MAX_SEED}, got {2**63}"),
]


@pytest.mark.parametrize("extra,line", GENERATE_EDGES, ids=[" ".join(e) for e, _ in GENERATE_EDGES])
def test_generate_numbers_fail_before_the_model_loads(cli, tmp_path, extra, line):
    # A model path that does not exist: the number is reported, so no model was looked for.
    code, _, err = cli("generate", "--model", tmp_path / "no-model", "--prompt", "a toy", "--output",
                       tmp_path / "out", *extra)
    assert one_error_line(code, err, line)
    assert not (tmp_path / "out").exists()


def test_generate_from_python_checks_the_same(tiny_sd1):
    from conceptor import api
    from conceptor.errors import ConceptorError

    model = api.load(str(tiny_sd1))
    for kwargs, line in [({"batch_size": 0}, "--batch-size"), ({"num_images": 0}, "--num-images"),
                         ({"width": -8}, "--width -8"), ({"height": 12}, "--height 12"), ({"steps": 0}, "--steps"),
                         ({"guidance": float("inf")}, "--guidance"), ({"seed": -1}, "--seed"),
                         ({"seed": 2**63}, "--seed"), ({"seed": 1.5}, "--seed")]:
        with pytest.raises(ConceptorError, match=line):
            model.generate("a toy", steps=kwargs.pop("steps", 1), **kwargs)
    assert len(model.generate("a toy", steps=1, seed=MAX_SEED)) == 1  # the largest seed works


# -- 4. sizes whose memory cannot exist ---------------------------------------------------------------------
def test_generate_size_beyond_memory(cli, tiny_sd1, tmp_path):
    code, _, err = cli("generate", "--model", tiny_sd1, "--prompt", "a toy", "--width", "400000", "--height",
                       "400000", "--output", tmp_path / "out")
    line = one_error_line(code, err, "--width 400000 --height 400000 needs at least", "GB for the VAE decoder alone;",
                          "GB free")
    assert "10240.0 GB" in line  # 1 image x 16 channels (the tiny VAE's first block) x 400000^2 x 4 bytes
    assert not (tmp_path / "out").exists()


def test_training_resolution_beyond_memory(cli, tiny_sd1, concept_images, tmp_path):
    code, _, err = cli(*ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "1", "--resolution", "200000"))
    one_error_line(code, err, "--resolution 200000 needs at least", "GB for the VAE encoder alone;", "GB free")
    assert nothing_written(tmp_path / "run")


def test_memory_check_is_a_lower_bound_of_the_vae(tiny_sd1, monkeypatch):
    import torch

    from conceptor.errors import ConceptorError
    from conceptor.models.load import load_components
    from conceptor.sampling import pipeline

    vae = load_components(str(tiny_sd1)).vae
    pipeline.check_vae_memory(vae, 8, 512, 512, "--resolution 512", "VAE encoder")  # 134 MB: fits anywhere
    monkeypatch.setattr(pipeline, "free_memory", lambda device: 5 * 10**8)
    # batch x block_out_channels[0] x H x W x bytes: 2 x 16 x 4000 x 4000 x 2 (fp16) = 1.0 GB
    with pytest.raises(ConceptorError, match=r"^x needs at least 1\.0 GB for the VAE encoder alone; this machine "
                                             r"has 0\.5 GB free$"):
        pipeline.check_vae_memory(vae.to(torch.float16), 2, 4000, 4000, "x", "VAE encoder")


# -- 5. the placeholder past the text encoder's limit; long prompts warned once -------------------------------
def test_caption_puts_the_token_past_the_limit(cli, tiny_sd1, concept_images, tmp_path):
    (concept_images / "0.txt").write_text(f"{LONG} {TOKEN}")
    code, _, err = cli(*ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "1"))
    one_error_line(code, err, f"caption {concept_images / '0.txt'} puts {TOKEN} at token 82, past the text "
                              "encoder's 77-token limit", "shorten the text before the token")
    assert nothing_written(tmp_path / "run")


def test_multi_vector_token_must_fit_whole(cli, tiny_sd1, concept_images, tmp_path):
    # 74 words + start token: the first vector is token 76 (fits), the third would be 78.
    (concept_images / "1.txt").write_text(" ".join(["toy"] * 74) + " {}")
    code, _, err = cli(*ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "1", "--vectors", "3"))
    one_error_line(code, err, "1.txt puts <t> at tokens 76-78")
    assert nothing_written(tmp_path / "run")


def test_template_puts_the_token_past_the_limit(cli, tiny_sd1, concept_images, tmp_path):
    (tmp_path / "templates.txt").write_text("a photo of {}\n" + LONG + " {}\n")
    code, _, err = cli(*ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "1", "--templates",
                           tmp_path / "templates.txt"))
    one_error_line(code, err, "template 'toy toy", "templates.txt puts <t> at token 82")
    assert nothing_written(tmp_path / "run")


def test_long_caption_with_the_token_early_trains_and_warns_once(cli, tiny_sd1, concept_images, tmp_path,
                                                                 monkeypatch):
    from conceptor.models import text

    monkeypatch.setattr(text, "_CUT_REPORTED", set())
    (concept_images / "0.txt").write_text(f"a photo of {TOKEN} {LONG}")
    code, _, err = cli(*ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "4", "--batch-size", "2"))
    assert code == 0, err
    assert err.count("is 86 tokens; the text encoder reads 77, so its last 9 are ignored") == 1, err  # once in 4 steps


def test_long_prompt_generated_twice_is_warned_once(cli, tiny_sd1, tmp_path, monkeypatch):
    from conceptor.models import text

    monkeypatch.setattr(text, "_CUT_REPORTED", set())
    prompt = f"a photo of a cat {LONG} on the moon"
    errs = ""
    for run in ("a", "b"):
        code, _, err = cli("generate", "--model", tiny_sd1, "--prompt", prompt, "--steps", "1", "--num-images", "2",
                           "--batch-size", "1", "--output", tmp_path / run)
        assert code == 0, err
        errs += err
    warnings = [ln for ln in errs.splitlines() if "the text encoder reads 77" in ln]
    assert len(warnings) == 1, errs
    assert "so its last 15 are ignored: 'toy toy toy toy toy toy toy toy toy toy on the moon'" in warnings[0]

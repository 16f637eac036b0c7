"""Generation settings in each PNG, in A1111's "parameters" chunk: written by `conceptor generate`, read back by
A1111's rules (prompt lines, a "Negative prompt:" line, one line of Key: value pairs)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conceptor.formats.png_info import format_parameters, parse_parameters, png_info, read_png_parameters


def test_the_a1111_layout_exactly():
    text = format_parameters("a photo of <cat-toy>, on the beach", "blurry, low quality",
                             {"Steps": 30, "Sampler": "DDIM", "CFG scale": 7.5, "Seed": 3, "Size": "512x512",
                              "Model": "sd15", "Conceptor LoRAs": "dog:0.8, style:1.0", "Skipped": None})
    assert text == ('a photo of <cat-toy>, on the beach\nNegative prompt: blurry, low quality\n'
                    'Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 512x512, Model: sd15, '
                    'Conceptor LoRAs: "dog:0.8, style:1.0"')
    prompt, negative, pairs = parse_parameters(text)
    assert (prompt, negative) == ("a photo of <cat-toy>, on the beach", "blurry, low quality")
    assert pairs == {"Steps": "30", "Sampler": "DDIM", "CFG scale": "7.5", "Seed": "3", "Size": "512x512",
                     "Model": "sd15", "Conceptor LoRAs": "dog:0.8, style:1.0"}


def test_a_prompt_without_settings_is_all_prompt():
    assert parse_parameters("just a prompt\nover two lines") == ("just a prompt\nover two lines", "", {})


@settings(max_examples=150, deadline=None)
@given(prompt=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\x00"), min_size=1),
       negative=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\x00")),
       value=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\x00\n")))
def test_any_text_round_trips(prompt, negative, value):
    """Whatever the prompt holds (commas, colons, quotes, newlines), prompt, negative prompt and settings come
    back exactly (a prompt line that starts with the negative-prompt marker is A1111's ambiguity too)."""
    if any(line.startswith("Negative prompt:") for line in prompt.split("\n")) or prompt.strip("\n") != prompt:
        return
    params = {"Steps": 9, "Sampler": "Euler a", "Seed": 1, "Extra": value}
    got_prompt, got_negative, pairs = parse_parameters(format_parameters(prompt, negative.strip() or None, params))
    assert pairs == {"Steps": "9", "Sampler": "Euler a", "Seed": "1", "Extra": value}
    assert (got_prompt, got_negative) == (prompt, negative.strip())


def test_generate_writes_the_chunk_pil_and_conceptor_read(cli, tiny_sd1, tmp_path):
    out = tmp_path / "gen"
    code, _, err = cli("generate", "--model", tiny_sd1, "--prompt", "a toy, red", "--negative-prompt", "blurry",
                       "--steps", "2", "--num-images", "2", "--seed", "7", "--scheduler", "euler-a",
                       "--guidance", "5", "--output", out)
    assert code == 0, err
    for i, name in enumerate(["000-seed7.png", "001-seed8.png"]):
        text = Image.open(out / name).info["parameters"]  # what A1111's PNG Info reads
        assert read_png_parameters(out / name) == text
        prompt, negative, pairs = parse_parameters(text)
        assert (prompt, negative) == ("a toy, red", "blurry")
        assert pairs["Steps"] == "2" and pairs["Sampler"] == "Euler a" and pairs["CFG scale"] == "5.0"
        assert pairs["Seed"] == str(7 + i) and pairs["Size"] == "32x32" and pairs["Model"] == tiny_sd1.name
        assert pairs["Version"].startswith("conceptor")


def test_png_info_is_a_text_chunk(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_info("p\nSteps: 1, Sampler: DDIM, Seed: 2"))
    assert read_png_parameters(path) == "p\nSteps: 1, Sampler: DDIM, Seed: 2"
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert read_png_parameters(tmp_path / "plain.png") is None


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_info_reads_images_and_weight_headers(cli, tiny_sd1, tmp_path):
    out = tmp_path / "gen"
    assert cli("generate", "--model", tiny_sd1, "--prompt", "a toy", "--steps", "1", "--output", out)[0] == 0
    code, text, err = cli("info", out / "000-seed0.png")
    assert code == 0, err
    assert "prompt: a toy" in text and "Steps: 1" in text and "Seed: 0" in text and str(tmp_path) not in text
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "w.safetensors"), metadata={"ss_network_dim": "4"})
    code, text, err = cli("info", tmp_path / "w.safetensors")
    assert code == 0 and "w.safetensors: 1 tensor\n" in text and "ss_network_dim  4\n" in text, err
    (tmp_path / "junk.png").write_bytes(b"not a png")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 20)
    for name, needle in (("junk.png", "neither a PNG"), ("bad.safetensors", "not a valid"),
                         ("missing.png", "not a file")):
        code, _, err = cli("info", tmp_path / name)
        assert code == 2 and needle in err and "Traceback" not in err, err
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    code, _, err = cli("info", tmp_path / "plain.png")
    assert code == 2 and "no generation settings" in err

"""Embedding files: every layout round-trips bit-exactly, hostile and broken files are refused cleanly."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conceptor.errors import ConceptorError
from conceptor.formats.embeddings import (
    Embedding,
    convert_embedding,
    detect_format,
    read_embedding,
    write_embedding,
    write_embedding_sdxl_diffusers,
)


@pytest.fixture()
def emb():
    return Embedding("<cat-toy>", torch.randn(3, 32))


@pytest.mark.parametrize("fmt,name", [("diffusers", "e.safetensors"), ("a1111", "e.pt"),
                                      ("a1111", "e.safetensors"), ("kohya", "e.safetensors")])
def test_round_trip(emb, tmp_path, fmt, name):
    path = write_embedding(emb, tmp_path / name, fmt)
    back = read_embedding(path)
    assert back.token == emb.token and torch.equal(back.vectors, emb.vectors)


def test_conversion_chain_is_exact(emb, tmp_path):
    write_embedding(emb, tmp_path / "a.safetensors", "diffusers")
    convert_embedding(tmp_path / "a.safetensors", tmp_path / "b.pt", "a1111")
    convert_embedding(tmp_path / "b.pt", tmp_path / "c.safetensors", "kohya")
    convert_embedding(tmp_path / "c.safetensors", tmp_path / "d.safetensors", "diffusers")
    back = read_embedding(tmp_path / "d.safetensors")
    assert back.token == "<cat-toy>" and torch.equal(back.vectors, emb.vectors)


def test_a1111_file_as_the_webui_writes_it(tmp_path):
    """The web UI pickles nn.Parameter values and names the trigger by the file name."""
    v = torch.randn(2, 32)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(v)},
                "name": "grooty", "step": 3000, "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"},
               tmp_path / "grooty.pt")
    back = read_embedding(tmp_path / "grooty.pt")
    assert back.token == "grooty" and torch.equal(back.vectors, v)
    assert read_embedding(tmp_path / "grooty.pt", token="<g>").token == "<g>"


def test_kohya_without_name_uses_file_stem(tmp_path):
    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "my-style.safetensors"))
    assert read_embedding(tmp_path / "my-style.safetensors").token == "my-style"


def test_legacy_1d_diffusers(tmp_path):
    save_file({"<x>": torch.randn(32)}, str(tmp_path / "x.safetensors"))
    assert read_embedding(tmp_path / "x.safetensors").vectors.shape == (1, 32)


def test_sdxl_layouts(tmp_path):
    e = Embedding("<s>", torch.randn(2, 768), torch.randn(2, 1280))
    write_embedding(e, tmp_path / "s.safetensors", "kohya")
    back = read_embedding(tmp_path / "s.safetensors")
    assert torch.equal(back.vectors, e.vectors) and torch.equal(back.vectors_2, e.vectors_2)
    l, g = write_embedding_sdxl_diffusers(e, tmp_path / "dif")
    assert torch.equal(read_embedding(l).vectors, e.vectors) and torch.equal(read_embedding(g).vectors, e.vectors_2)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_code_pickle_is_refused_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"string_to_param": {"*": _Evil(marker)}}, path)
    with pytest.raises(ConceptorError, match="NOT loaded"):
        read_embedding(path)
    with open(tmp_path / "plain.pkl", "wb") as f:  # a raw pickle, not a torch zip, too
        pickle.dump(_Evil(marker), f)
    os.replace(tmp_path / "plain.pkl", path)
    with pytest.raises(ConceptorError):
        read_embedding(path)
    assert not marker.exists()


@pytest.mark.parametrize("sd,needle", [
    ({}, "no tensors"),
    ({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, "not a textual-inversion"),
    ({"<x>": torch.full((1, 4), float("nan"))}, "NaN"),
    ({"<x>": torch.zeros(1, 2, 4)}, "shape"),
    ({"<x>": torch.zeros(1, 4, dtype=torch.int64)}, "dtype"),
    ({"emb_params": torch.zeros(0, 4)}, "shape"),
])
def test_bad_contents(tmp_path, sd, needle):
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ConceptorError, match=needle):
        read_embedding(path)


def test_truncated_and_lying_headers(emb, tmp_path):
    good = write_embedding(emb, tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) - 10])
    (tmp_path / "huge.safetensors").write_bytes((10**12).to_bytes(8, "little") + good[8:])
    for name in ("cut.safetensors", "huge.safetensors"):
        with pytest.raises(ConceptorError, match=name):
            read_embedding(tmp_path / name)
    with pytest.raises(ConceptorError, match="does not exist"):
        read_embedding(tmp_path / "missing.safetensors")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ConceptorError, match="unknown weights format"):
        read_embedding(tmp_path / "x.txt")


def test_detect_format():
    v = torch.zeros(1, 4)
    assert detect_format({"<t>": v}) == "diffusers"
    assert detect_format({"string_to_param": {"*": v}}) == "a1111"
    assert detect_format({"string_to_param.*": v}) == "a1111"
    assert detect_format({"emb_params": v}) == "kohya"
    assert detect_format({"clip_l": v, "clip_g": v}) == "sdxl"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512), suffix=st.sampled_from([".safetensors", ".pt"]))
def test_fuzz_any_bytes_give_a_clean_answer(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        out = read_embedding(path)
    except ConceptorError:
        return
    assert isinstance(out, Embedding) and out.vectors.ndim == 2


def test_convert_cli(cli, emb, tmp_path):
    src = write_embedding(emb, tmp_path / "learned_embeds.safetensors")
    code, out, err = cli("convert", "embedding", src, tmp_path / "cat-toy.pt", "--to", "a1111")
    assert code == 0, err
    assert torch.equal(read_embedding(tmp_path / "cat-toy.pt").vectors, emb.vectors)
    code, out, err = cli("convert", "embedding", src, tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 0 and "3 vector(s)" in out
    code, _, err = cli("convert", "embedding", tmp_path / "nope.pt", tmp_path / "o.pt", "--to", "a1111")
    assert code == 2 and err.startswith("error:") and "does not exist" in err

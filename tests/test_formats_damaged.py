"""Files from other people: odd, damaged or hostile embeddings and LoRAs each get one line naming the file and
the key, exit code 2, no traceback, no output written and the input untouched; outputs match their extension."""
from __future__ import annotations

import os
import pickle
import random
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from test_formats_embeddings import _Evil  # the hostile pickle: its __reduce__ calls os.system

from conceptor.errors import ConceptorError
from conceptor.formats.embeddings import Embedding, read_embedding, write_embedding
from conceptor.formats.lora import read_lora, write_lora

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
_g = torch.Generator().manual_seed(0)
V, DOWN, UP = torch.randn(2, 8, generator=_g), torch.randn(2, 8, generator=_g), torch.randn(8, 2, generator=_g)


def assert_refused(code, err, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def convert(cli, kind, src, dst, to):
    """Run ``conceptor convert``; check that a refusal left the input as it was and wrote nothing."""
    before = src.read_bytes()
    code, out, err = cli("convert", kind, src, dst, "--to", to)
    assert src.read_bytes() == before
    if code != 0:
        assert not dst.exists() and not [p for p in dst.parent.iterdir() if p.name.endswith(".tmp")]
    return code, out, err


def kohya(**change):
    """A valid one-layer kohya LoRA (alpha 2 = rank 2), with ``down``, ``up`` or ``alpha`` replaced."""
    sd = {"down": DOWN.clone(), "up": UP.clone(), "alpha": torch.tensor(2.0), **change}
    return {f"{Q}.lora_down.weight": sd["down"], f"{Q}.lora_up.weight": sd["up"], f"{Q}.alpha": sd["alpha"]}

def _lora_file(tmp_path):
    save_file(kohya(), str(tmp_path / "k.safetensors"))
    return tmp_path / "k.safetensors"


# -- 1. odd but well-formed embeddings -------------------------------------------------------------------

@pytest.mark.parametrize("sd,needles", [
    ({"emb_params": [1.0, 2.0]}, ["emb_params holds a list value, not a tensor"]),
    ({"string_to_token": {"*": 265}, "string_to_param": {"*": [1.0]}}, ["string_to_param['*'] holds a list"]),
    ({"string_to_param": {1: "vectors"}}, ["string_to_param[1] holds a str value"]),
    ({"string_to_param": V}, ["string_to_param is empty or not a mapping"]),
    ({"string_to_param": {}}, ["string_to_param is empty or not a mapping"]),
    ({"emb_params": torch.tensor(1.0)}, ["emb_params has shape ()", "[num_vectors, hidden]"]),
    ({"emb_params": torch.randn(1, 2, 8)}, ["emb_params has shape (1, 2, 8)"]),
    ({"string_to_param": {"*": torch.randn(0)}}, ["string_to_param['*'] has shape (0,)"]),
    ({"emb_params": torch.zeros(2, 8, dtype=torch.int64)}, ["emb_params has dtype torch.int64"]),
    ({"emb_params": V.to_sparse()}, ["emb_params is a torch.sparse_coo tensor"]),
    ({}, ["holds no tensors"]),
    ({7: V}, ["its one key 7 (of type int) is not a token name"]),
    ({"clip_l": torch.randn(2, 8), "clip_g": torch.randn(3, 12)}, ["clip_l holds 2 vector(s) but clip_g 3"]),
    ({"emb_params": torch.tensor([[0.0, float("nan")]])}, ["emb_params holds NaN/inf; the file is damaged"]),
    ({"clip_l": torch.randn(1, 8), "clip_g": torch.full((1, 12), float("inf"))}, ["clip_g holds NaN/inf"]),
])
def test_odd_embedding_is_named(cli, tmp_path, sd, needles):
    src = tmp_path / "odd.pt"
    torch.save(sd, src)
    code, _, err = convert(cli, "embedding", src, tmp_path / "out.safetensors", "kohya")
    assert_refused(code, err, "odd.pt", *needles)


def test_odd_but_loadable_embeddings_read_as_a1111_reads_them(tmp_path):
    """A1111 takes string_to_param's one value whatever its key, and kohya reads a 1-D tensor as one vector."""
    torch.save({"string_to_token": {3: 265}, "string_to_param": {3: V}, "name": "n"}, tmp_path / "int.pt")
    torch.save({"emb_params": V[0]}, tmp_path / "flat.pt")
    back = read_embedding(tmp_path / "int.pt")
    assert torch.equal(back.vectors, V) and back.token == "n"
    assert torch.equal(read_embedding(tmp_path / "flat.pt").vectors, V[:1])


_leaf = st.one_of(
    st.none(), st.integers(-3, 300), st.text(max_size=3), st.floats(allow_nan=True),
    st.builds(lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
              st.lists(st.integers(0, 3), max_size=3).map(tuple),
              st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
              st.sampled_from([0.5, -2.0, float("nan"), float("inf")])))
_value = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=2), st.dictionaries(st.one_of(st.sampled_from(["*", "x"]), st.integers(0, 2)),
                                                 inner, max_size=2)), max_leaves=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sd=st.dictionaries(st.one_of(st.sampled_from(["string_to_param", "string_to_token", "emb_params", "clip_l",
                                                     "clip_g", "name", "<t>", "string_to_param.*"]),
                                    st.integers(0, 2)), _value, max_size=3))
def test_any_embedding_structure_reads_or_is_named(tmp_path, sd):
    path = tmp_path / "gen.pt"
    torch.save(sd, path)
    try:
        emb = read_embedding(path)
    except ConceptorError as e:
        assert "gen.pt" in str(e) and "\n" not in str(e)
        return
    assert isinstance(emb.token, str) and emb.vectors.ndim == 2 and emb.vectors.dtype == torch.float32
    assert torch.isfinite(emb.vectors).all() and min(emb.vectors.shape) > 0


# -- 1 and 2. odd LoRAs, NaN where it enters ------------------------------------------------------------

@pytest.mark.parametrize("sd,needles", [
    (kohya(alpha=torch.tensor([1.0, 2.0])), [f"{Q}.alpha has shape (2,); alpha is a single number"]),
    (kohya(alpha=torch.tensor(float("nan"))), [f"{Q}.alpha holds NaN/inf; the file is damaged"]),
    (kohya(alpha=torch.tensor(0.0)), [f"{Q}.alpha is 0, but alpha must be positive"]),
    (kohya(alpha=torch.tensor(-4.0)), [f"{Q}.alpha is -4, but alpha must be positive", "FILE:-1"]),
    (kohya(alpha=torch.tensor(True)), [f"{Q}.alpha has dtype torch.bool"]),
    (kohya(alpha=torch.tensor(1e38), up=torch.full((8, 2), 1e10)), [f"{Q}.alpha is 1e+38, which overflows"]),
    (kohya(down=torch.zeros(0, 8), up=torch.zeros(8, 0)), [f"{Q}.lora_down.weight has shape (0, 8)", "rank 0"]),
    (kohya(down=torch.randn(8)), [f"{Q}.lora_down.weight has shape (8,)", "only Linear-layer"]),
    (kohya(down=torch.randn(2, 8, 3)), [f"{Q}.lora_down.weight has shape (2, 8, 3)", "only Linear-layer"]),
    (kohya(down=torch.zeros(2, 8, dtype=torch.int64)), [f"{Q}.lora_down.weight has dtype torch.int64"]),
    (kohya(up=torch.ones(8, 2, dtype=torch.int32)), [f"{Q}.lora_up.weight has dtype torch.int32"]),
    (kohya(up=torch.randn(8, 3)), ["do not chain", f"{Q}.lora_up.weight x {Q}.lora_down.weight"]),
    (kohya(up=torch.full((8, 2), float("nan"))), [f"lora.safetensors: {Q}.lora_up.weight holds NaN/inf; "
                                                  "the file is damaged"]),
    (kohya(down=torch.full((2, 8), float("-inf"))), [f"{Q}.lora_down.weight holds NaN/inf"]),
    ({"unet.x.lora_A.weight": torch.randn(2, 4), "unet.x.lora_B.weight": torch.full((4, 2), float("nan"))},
     ["unet.x.lora_B.weight holds NaN/inf"]),
])
def test_odd_lora_is_named(cli, tmp_path, sd, needles):
    src = tmp_path / "lora.safetensors"
    save_file(sd, str(src))
    code, _, err = convert(cli, "lora", src, tmp_path / "out.safetensors", "diffusers")
    assert_refused(code, err, "lora.safetensors", *needles)


@pytest.mark.parametrize("sd,needles", [
    ({1: torch.randn(2, 8), f"{Q}.lora_up.weight": torch.randn(8, 2)}, ["key 1 (of type int) is not a name"]),
    (kohya(down=[1.0, 2.0]), [f"{Q}.lora_down.weight holds a list value, not a tensor"]),
    (kohya(alpha=2), [f"{Q}.alpha holds a int value"]),
])
def test_odd_lora_pickle_is_named(cli, tmp_path, sd, needles):
    src = tmp_path / "lora.pt"
    torch.save(sd, src)
    code, _, err = convert(cli, "lora", src, tmp_path / "out.safetensors", "kohya")
    assert_refused(code, err, "lora.pt", *needles)


@pytest.mark.parametrize("alpha", [torch.tensor([2.0]), torch.tensor([[2.0]]), torch.tensor(2), torch.tensor(2.0)])
def test_single_number_alphas_read_alike(tmp_path, alpha):
    """A1111, ComfyUI and diffusers read alpha with .item(): [1], [1, 1] and integer alphas are the same LoRA."""
    save_file(kohya(alpha=alpha), str(tmp_path / "a.safetensors"))
    save_file(kohya(), str(tmp_path / "ref.safetensors"))
    (d, u), = read_lora(tmp_path / "a.safetensors").values()
    (d0, u0), = read_lora(tmp_path / "ref.safetensors").values()
    assert torch.equal(d, d0) and torch.equal(u, u0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.lists(st.integers(0, 3), max_size=3).map(tuple), min_size=3, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8]),
       fill=st.sampled_from([0.5, 0.0, -1.0, float("nan"), float("inf"), 1e30]))
def test_any_lora_shapes_read_or_are_named(tmp_path, shapes, dtype, fill):
    sd = {k: torch.full(s, fill).to(dtype) for k, s in zip((f"{Q}.lora_down.weight", f"{Q}.lora_up.weight",
                                                            f"{Q}.alpha"), shapes)}
    save_file(sd, str(tmp_path / "gen.safetensors"))
    try:
        lora = read_lora(tmp_path / "gen.safetensors")
    except ConceptorError as e:
        assert "gen.safetensors" in str(e) and "\n" not in str(e)
        return
    (down, up), = lora.values()
    assert down.ndim == up.ndim == 2 and up.shape[1] == down.shape[0] > 0
    assert torch.isfinite(down).all() and torch.isfinite(up).all()


def _tiny_lora(tiny_sd1, fill: float) -> dict:
    """A kohya LoRA that fits the tiny UNet's first to_q, so only its values can be wrong."""
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    with safe_open(str(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        out, width = f.get_slice(key).get_shape()
    return kohya(down=torch.randn(2, width) * 0.01, up=torch.full((out, 2), fill))


def test_generate_names_a_nan_lora_where_it_enters(cli, tiny_sd1, tmp_path):
    save_file(_tiny_lora(tiny_sd1, float("nan")), str(tmp_path / "lora.safetensors"))
    code, _, err = cli("generate", "--model", tiny_sd1, "--prompt", "a toy", "--steps", "1",
                       "--lora", tmp_path / "lora.safetensors", "--output", tmp_path / "gen")
    assert_refused(code, err, f"lora.safetensors: {Q}.lora_up.weight holds NaN/inf; the file is damaged")
    assert "guidance" not in err and not (tmp_path / "gen").exists()


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_lora_scale_is_refused_at_parse_time(cli, tmp_path, scale):
    save_file(kohya(), str(tmp_path / "lora.safetensors"))
    code, _, err = cli("generate", "--model", tmp_path / "no-model-needed", "--prompt", "a toy",
                       "--lora", f"{tmp_path / 'lora.safetensors'}:{scale}", "--output", tmp_path / "gen")
    assert_refused(code, err, f"the scale {scale} is not a finite number")  # before the (missing) model loads
    assert not (tmp_path / "gen").exists()


def test_library_lora_scale_must_be_finite(tmp_path):
    from conceptor.api import Model

    save_file(kohya(), str(tmp_path / "lora.safetensors"))
    with pytest.raises(ConceptorError, match="scale nan for lora.safetensors is not a finite number"):
        Model(components=None).add_lora(tmp_path / "lora.safetensors", float("nan"))


# -- 3. damaged versus hostile pickles ------------------------------------------------------------------

def _torch_zip(path):
    torch.save({"emb_params": V}, path)
    return path.read_bytes()


def _legacy(path):
    torch.save({"emb_params": V}, path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


def _raw_pickle(obj):
    return pickle.dumps(obj, protocol=4)


@pytest.mark.parametrize("make,needles", [
    (lambda t: random.Random(0).randbytes(4096), ["damaged or not a PyTorch file", "neither a zip archive nor"]),
    (lambda t: b"", ["damaged or not a PyTorch file (the file is empty)"]),
    (lambda t: _torch_zip(t / "z.pt")[:-200], ["damaged or not a PyTorch file", "zip archive is cut short"]),
    (lambda t: _torch_zip(t / "z.pt")[:300], ["damaged or not a PyTorch file", "zip archive is cut short"]),
    (lambda t: _legacy(t / "l.pt")[:200], ["damaged or not a PyTorch file", "cut short or corrupted"]),
    (lambda t: _raw_pickle({"emb_params": [1.0]}), ["damaged or not a PyTorch file", "a plain pickle"]),
    (lambda t: (save_file({"emb_params": V}, str(t / "s.safetensors")), (t / "s.safetensors").read_bytes())[1],
     ["holds safetensors data under a .pt name; rename it to odd.safetensors"]),
])
def test_damaged_pickle_is_not_called_code(cli, tmp_path, make, needles):
    src = tmp_path / "odd.pt"
    src.write_bytes(make(tmp_path))
    code, _, err = convert(cli, "embedding", src, tmp_path / "out.safetensors", "kohya")
    line = assert_refused(code, err, "odd.pt", *needles)
    assert "code" not in line and "NOT loaded" not in line


@pytest.mark.parametrize("how", ["torch.save", "legacy torch.save", "pickle.dump", "pickle protocol 0"])
def test_hostile_pickle_is_refused_and_never_runs(cli, tmp_path, how):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pt"
    payload = {"emb_params": _Evil(marker)}
    if how == "torch.save":
        torch.save(payload, src)
    elif how == "legacy torch.save":
        torch.save(payload, src, _use_new_zipfile_serialization=False)
    else:
        src.write_bytes(pickle.dumps(payload, protocol=4 if how == "pickle.dump" else 0))
    code, _, err = convert(cli, "embedding", src, tmp_path / "out.safetensors", "kohya")
    assert_refused(code, err, "evil.pt is a pickle that holds code or objects", "NOT loaded")
    assert "Detected pickle protocol" not in err  # torch's own warning does not crowd the one line
    assert not marker.exists()


def test_legacy_tensor_pickle_still_loads(cli, tmp_path):
    _legacy(tmp_path / "old.pt")
    code, _, err = convert(cli, "embedding", tmp_path / "old.pt", tmp_path / "new.safetensors", "kohya")
    assert code == 0, err
    assert torch.equal(read_embedding(tmp_path / "new.safetensors").vectors, V)


# -- 4. a written file's bytes match its extension; never onto the input -------------------------------

@pytest.fixture()
def sd1_emb(tmp_path):
    return write_embedding(Embedding("<t>", V), tmp_path / "learned_embeds.safetensors")


@pytest.fixture()
def sdxl_emb(tmp_path):
    return write_embedding(Embedding("<x>", torch.randn(2, 8), torch.randn(2, 12)), tmp_path / "sdxl.safetensors",
                           "kohya")


@pytest.mark.parametrize("name", ["x.pt", "x.bin", "X.PT"])
def test_a1111_pickle_output_is_a_real_tensors_only_torch_file(cli, sd1_emb, tmp_path, name):
    dst = tmp_path / name
    code, _, err = convert(cli, "embedding", sd1_emb, dst, "a1111")
    assert code == 0, err
    assert zipfile.is_zipfile(dst)
    data = torch.load(dst, weights_only=True)
    assert data["string_to_token"] == {"*": 265} and torch.equal(data["string_to_param"]["*"], V)
    assert read_embedding(dst).token == "<t>"


@pytest.mark.parametrize("src,dst,to,needles", [
    ("sdxl", "x.pt", "a1111", ["x.pt: SDXL embeddings have no .pt form", "name it x.safetensors"]),
    ("sdxl", "x.bin", "kohya", ["x.bin: SDXL embeddings have no .bin form"]),
    ("sdxl", "x.safetensors", "diffusers", ["diffusers keeps SDXL embeddings as two files", "give a folder"]),
    ("sd1", "x.pt", "kohya", ["x.pt: kohya embeddings are written as .safetensors; name it x.safetensors"]),
    ("sd1", "x.bin", "diffusers", ["x.bin: diffusers embeddings are written as .safetensors"]),
    ("sd1", "x.txt", "a1111", ["x.txt: a1111 embeddings are written as .safetensors (or .pt/.bin for a1111)"]),
    ("sd1", "x", "a1111", ["x: a1111 embeddings are written as .safetensors"]),
])
def test_embedding_output_extension_must_fit(cli, sd1_emb, sdxl_emb, tmp_path, src, dst, to, needles):
    code, _, err = convert(cli, "embedding", sd1_emb if src == "sd1" else sdxl_emb, tmp_path / dst, to)
    assert_refused(code, err, *needles)


@pytest.mark.parametrize("name", ["x.pt", "x.bin", "x.ckpt", "x"])
def test_lora_output_must_be_safetensors(cli, tmp_path, name):
    save_file(kohya(), str(tmp_path / "lora.safetensors"))
    code, _, err = convert(cli, "lora", tmp_path / "lora.safetensors", tmp_path / name, "diffusers")
    assert_refused(code, err, f"{name}: LoRA files are written as .safetensors", "name it x.safetensors")


@pytest.mark.parametrize("kind,spelling", [("embedding", "same"), ("embedding", "dotdot"), ("embedding", "symlink"),
                                           ("embedding", "hardlink"), ("lora", "same"), ("lora", "hardlink")])
def test_convert_onto_its_own_input_is_refused(cli, sd1_emb, tmp_path, kind, spelling):
    src = sd1_emb if kind == "embedding" else write_lora(read_lora(_lora_file(tmp_path)), tmp_path / "l.safetensors")
    dst = {"same": src, "dotdot": tmp_path / "sub" / ".." / src.name}.get(spelling, tmp_path / "other.safetensors")
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        dst.symlink_to(src)
    elif spelling == "hardlink":
        os.link(src, dst)
    before = src.read_bytes()
    code, _, err = cli("convert", kind, src, dst, "--to", "kohya")
    assert_refused(code, err, "is the input file", "another name")
    assert src.read_bytes() == before and dst.read_bytes() == before


def test_sdxl_to_diffusers_folder_holding_the_input_is_refused(cli, tmp_path):
    src = write_embedding(Embedding("<x>", torch.randn(1, 8), torch.randn(1, 12)),
                          tmp_path / "learned_embeds.safetensors", "kohya")
    before = src.read_bytes()
    code, _, err = cli("convert", "embedding", src, tmp_path, "--to", "diffusers")
    assert_refused(code, err, "is the input file")
    assert src.read_bytes() == before and not (tmp_path / "learned_embeds_2.safetensors").exists()


# -- 5. the CLI converts LoRAs through the api ----------------------------------------------------------

def test_cli_lora_conversion_goes_through_the_api(cli, tmp_path, monkeypatch):
    import conceptor.api as api

    calls = []
    real = api.convert_lora
    monkeypatch.setattr(api, "convert_lora", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    code, out, err = cli("convert", "lora", _lora_file(tmp_path), tmp_path / "d.safetensors", "--to", "diffusers")
    assert code == 0 and len(calls) == 1 and "1 layer(s), rank 2" in out, err
    (down, up), = read_lora(tmp_path / "d.safetensors").values()
    (d0, u0), = read_lora(_lora_file(tmp_path)).values()
    assert torch.equal(down, d0) and torch.equal(up, u0)

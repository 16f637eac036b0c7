"""``conceptor lora merge|resize|extract`` on tiny models: every printed error against the same number computed
here from the tensors, Eckart-Young optimality of resize, merges equal to loading LoRAs one by one, and bad input
refused in one line with nothing written."""
from __future__ import annotations

import re

import pytest
import torch

from conceptor import api, lora_tools
from conceptor.formats import lycoris
from conceptor.formats.lora import apply_lora_to, read_lora, write_lora
from conceptor.formats.lora_ops import layers_by_name, linear_layers
from conceptor.models.adapters import UNET_LORA_TARGETS
from conceptor.models.load import load_components

TARGETS = {"unet": UNET_LORA_TARGETS["attn-ff"], "text_encoder": ["q_proj", "v_proj"]}


def _number(text: str, label: str) -> float:
    match = re.search(re.escape(label) + r"[^:\n]*: ([-+0-9.eEinfa]+)", text)
    assert match, f"{label!r} not in output:\n{text}"
    return float(match.group(1))


def _shapes(model) -> dict[str, tuple[int, int]]:
    c = load_components(str(model))
    layers = linear_layers({"unet": c.unet, "text_encoder": c.text_encoder}, TARGETS)
    return {n: tuple(m.weight.shape) for n, m in layers.items()}


def _lora(shapes, rank, seed, kind="lora", limit=None):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in list(shapes.items())[:limit]:
        r = min(rank, o, i)
        down, up = torch.randn(r, i, generator=g) / i ** 0.5, torch.randn(o, r, generator=g) * 0.05
        if kind == "dora":
            out[name] = lycoris.Dora(down, up, torch.rand(o, generator=g) + 0.5)
        elif kind == "loha":
            out[name] = lycoris.Loha(up, down, torch.randn(o, r, generator=g), torch.randn(r, i, generator=g) / i ** .5)
        else:
            out[name] = (down, up)
    return out


@pytest.fixture(scope="module")
def sd1_shapes(tiny_sd1):
    return _shapes(tiny_sd1)


def _dense(layer):
    down, up = (layer.down, layer.up) if isinstance(layer, lycoris.Dora) else layer
    return (up @ down).double()


def test_resize_to_own_rank_is_exact_and_lower_rank_is_eckart_young(sd1_shapes, tmp_path, cli):
    src = write_lora(_lora(sd1_shapes, 4, 0), tmp_path / "r4.safetensors")
    a = read_lora(src)
    code, out, err = cli("lora", "resize", src, tmp_path / "same.safetensors", "--rank", 4)
    assert code == 0, err
    b = read_lora(tmp_path / "same.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    assert _number(out, "relative error") == 0.0

    code, out, err = cli("lora", "resize", src, tmp_path / "r2.safetensors", "--rank", 2)
    assert code == 0, err
    r2 = read_lora(tmp_path / "r2.safetensors")
    num = den = 0.0
    kept = []
    for k, layer in a.items():
        dw, s = _dense(layer), torch.linalg.svdvals(_dense(layer))
        assert r2[k][0].shape[0] == 2
        err_k = float((dw - _dense(r2[k])).pow(2).sum())
        # Eckart-Young: the error of the best rank-2 matrix is the discarded spectrum; ours attains it
        assert err_k == pytest.approx(float(s[2:].pow(2).sum()), rel=1e-4, abs=1e-10)
        num, den = num + err_k, den + float(dw.pow(2).sum())
        kept.append(float(s[:2].pow(2).sum() / s.pow(2).sum()))
    assert _number(out, "relative error") == pytest.approx((num / den) ** 0.5, rel=1e-4)
    assert float(re.search(r"min ([0-9.e-]+)", out).group(1)) == pytest.approx(min(kept), rel=1e-4)
    assert float(re.search(r"mean ([0-9.e-]+)", out).group(1)) == pytest.approx(sum(kept) / len(kept), rel=1e-4)


def test_resize_loha_to_lora_and_dora_keeps_magnitude(sd1_shapes, tmp_path, cli):
    loha = _lora(sd1_shapes, 2, 1, "loha", limit=6)
    src = write_lora(loha, tmp_path / "loha.safetensors", to="kohya")
    code, out, err = cli("lora", "resize", src, tmp_path / "loha_r2.safetensors", "--rank", 2)
    assert code == 0, err
    assert "(kohya)" in out  # the input's layout
    got, want = read_lora(tmp_path / "loha_r2.safetensors"), read_lora(src)
    assert all(lycoris.kind_of(layer) == "lora" and layer[0].shape[0] == 2 for layer in got.values())
    diffs = [(lycoris.delta(want[k]).double(), _dense(got[k])) for k in want]
    expect = (sum(float((d - r).pow(2).sum()) for d, r in diffs) / sum(float(d.pow(2).sum()) for d, _ in diffs)) ** .5
    assert expect > 1e-3 and _number(out, "relative error") == pytest.approx(expect, rel=1e-4)

    dora = _lora(sd1_shapes, 4, 2, "dora", limit=6)
    src = write_lora(dora, tmp_path / "dora.safetensors")
    code, out, err = cli("lora", "resize", src, tmp_path / "dora_r1.safetensors", "--rank", 1)
    assert code == 0, err
    got, want = read_lora(tmp_path / "dora_r1.safetensors"), read_lora(src)
    assert all(isinstance(layer, lycoris.Dora) and layer.down.shape[0] == 1 for layer in got.values())
    assert all(torch.equal(got[k].magnitude, want[k].magnitude) for k in want)
    num = sum(float((_dense(want[k]) - _dense(got[k])).pow(2).sum()) for k in want)
    assert _number(out, "relative error") == pytest.approx((num / sum(float(_dense(w).pow(2).sum())
                                                                     for w in want.values())) ** .5, rel=1e-4)


def test_resize_bad_input(sd1_shapes, tmp_path, cli):
    src = write_lora(_lora(sd1_shapes, 4, 0, limit=3), tmp_path / "r4.safetensors")
    dst = tmp_path / "out.safetensors"
    for args, needle in [(("--rank", 5), "above"), (("--rank", 0), "at least 1"), (("--rank", -2), "at least 1"),
                         (("--rank", 2, "--to", "a1111"), "invalid choice")]:
        code, out, err = cli("lora", "resize", src, dst, *args)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not dst.exists()
    for a, b, needle in [(src, src, "input file"), (tmp_path / "nope.safetensors", dst, "does not exist")]:
        code, out, err = cli("lora", "resize", a, b, "--rank", 2)
        assert code == 2 and needle in err and "Traceback" not in err, err
    assert not dst.exists()


def _weight(c, name: str) -> torch.Tensor:
    """The fp64 weight a LoRA layer name points at (text-encoder names without CLIP's text_model. level)."""
    layers = layers_by_name({name: None}, {"unet": c.unet, "text_encoder": c.text_encoder})
    return layers[name].weight.detach().double()


def _weights(c) -> dict[str, torch.Tensor]:
    return {**{f"unet.{k}": v for k, v in c.unet.state_dict().items()},
            **{f"te.{k}": v for k, v in c.text_encoder.state_dict().items()}}


def test_merge_two_scaled_files_equals_loading_one_by_one(tiny_sd1, sd1_shapes, tmp_path, cli):
    a = write_lora(_lora(sd1_shapes, 2, 3), tmp_path / "a.safetensors", to="kohya")
    b = write_lora(_lora(sd1_shapes, 3, 4, "dora", limit=8), tmp_path / "b.safetensors")
    out = tmp_path / "merged"
    code, stdout, err = cli("lora", "merge", tiny_sd1, f"{a}:0.7", f"{b}:-0.5", "--output", out, "--save-single-file")
    assert code == 0, err
    assert "merged a.safetensors x0.7" in stdout and "merged b.safetensors x-0.5" in stdout
    assert _number(stdout, "relative error of the saved weights") == 0.0  # fp32 is written exactly
    want = api.load(str(tiny_sd1), loras=[f"{a}:0.7", f"{b}:-0.5"], device="cpu").components
    got = load_components(str(out))
    for k, v in _weights(want).items():
        assert torch.equal(_weights(got)[k], v), k
    single = api.load(str(out / "model.safetensors"), model_config=str(out), device="cpu").components
    for k, v in single.unet.state_dict().items():
        assert torch.allclose(v, want.unet.state_dict()[k], atol=1e-6), k

    # fp16: the printed error is ||W_saved - W_exact|| / ||W_exact - W_base|| over the changed layers
    code, stdout, err = cli("lora", "merge", tiny_sd1, f"{a}:0.7", "--output", out, "--dtype", "fp16")
    assert code == 0, err  # an earlier merge output may be replaced
    base, exact, saved = (load_components(str(m)) for m in (tiny_sd1, tiny_sd1, out))
    apply_lora_to(read_lora(a), {"unet": exact.unet, "text_encoder": exact.text_encoder}, 0.7)
    from safetensors.torch import load_file

    written = load_file(str(next((out / "unet").glob("*.safetensors"))))
    assert {v.dtype for v in written.values()} == {torch.float16}  # loaded back as fp32, written as fp16
    num = den = 0.0
    for name in read_lora(a):
        wb, we, ws = (_weight(c, name) for c in (base, exact, saved))
        num, den = num + float((ws - we).pow(2).sum()), den + float((we - wb).pow(2).sum())
    printed = _number(stdout, "relative error of the saved weights")
    assert printed > 0 and printed == pytest.approx((num / den) ** 0.5, rel=1e-3)


def test_merge_refusals_write_nothing(tiny_sd1, tiny_sdxl, sd1_shapes, tmp_path, cli):
    a = write_lora(_lora(sd1_shapes, 2, 3, limit=4), tmp_path / "a.safetensors")
    out = tmp_path / "merged"
    for args, needle in [((tiny_sdxl, a), "does not fit"), ((tiny_sd1, f"{a}:x"), "scale"),
                         ((tiny_sd1, f"{a}:nan"), "finite"),
                         ((tiny_sd1, tmp_path / "no.safetensors"), "does not exist"),
                         ((tiny_sd1, a, "--output", tiny_sd1), "the model"),
                         ((tiny_sd1, a, "--output", tiny_sd1 / "unet" / "x"), "the model"),
                         ((tiny_sd1, a, "--output", tmp_path), "LoRA")]:
        args = args if "--output" in args else (*args, "--output", out)
        code, stdout, err = cli("lora", "merge", *args)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not out.exists()
    (out / "notes").mkdir(parents=True)
    code, stdout, err = cli("lora", "merge", tiny_sd1, a, "--output", out)
    assert code == 2 and "not empty" in err and [p.name for p in out.iterdir()] == ["notes"]


@pytest.fixture(scope="module")
def dreambooth_run(tiny_sd1, tmp_path_factory):
    """A full DreamBooth run (UNet and text encoder, 2 steps): a fine-tune whose difference is not low-rank."""
    from PIL import Image

    from conceptor.config import build_config

    root = tmp_path_factory.mktemp("db")
    (root / "images").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 + 100 * i, 70, 200)).save(root / "images" / f"{i}.png")
    api.train(build_config("dreambooth", None, {
        "model": {"model": str(tiny_sd1)}, "data": {"images": str(root / "images")}, "optim": {"lr": 1e-2},
        "train": {"output": str(root / "run"), "steps": 2, "batch_size": 1, "checkpoint_every": 0},
        "dreambooth": {"instance_prompt": "a photo of sks toy", "train_text_encoder": True}}))
    return root / "run"


def _extracted_diffs(tuned, base, lora):
    t, b = load_components(str(tuned)), load_components(str(base))
    for name, layer in lora.items():
        yield name, _weight(t, name) - _weight(b, name), _dense(layer)


def test_extract_full_rank_reproduces_the_fine_tune_and_low_rank_error(dreambooth_run, tiny_sd1, tmp_path, cli):
    full = tmp_path / "full.safetensors"
    code, out, err = cli("lora", "extract", dreambooth_run, tiny_sd1, full, "--rank", 4096)
    assert code == 0, err
    lora = read_lora(full)
    assert any(k.startswith("unet.") for k in lora) and any(k.startswith("text_encoder.") for k in lora)
    merged, tuned = load_components(str(tiny_sd1)), load_components(str(dreambooth_run))
    apply_lora_to(lora, {"unet": merged.unet, "text_encoder": merged.text_encoder})
    layers = lambda c: linear_layers({"unet": c.unet, "text_encoder": c.text_encoder},  # noqa: E731
                                     {"unet": UNET_LORA_TARGETS["attn-ff"],
                                      "text_encoder": lora_tools.CLIP_LINEAR_TARGETS})
    lm, lt = layers(merged), layers(tuned)
    assert max(float((lm[k].weight - lt[k].weight).detach().abs().max()) for k in lt) < 1e-5
    assert _number(out, "relative error") < 1e-6

    low = tmp_path / "low.safetensors"
    code, out, err = cli("lora", "extract", dreambooth_run, tiny_sd1, low, "--rank", 2, "--to", "kohya",
                         "--no-text-encoder")
    assert code == 0, err
    diffs = list(_extracted_diffs(dreambooth_run, tiny_sd1, read_lora(low)))
    assert diffs and all(n.startswith("unet.") for n, _, _ in diffs)
    num = sum(float((d - r).pow(2).sum()) for _, d, r in diffs)
    den = sum(float(d.pow(2).sum()) for _, d, _ in diffs)
    assert num > 0 and _number(out, "relative error") == pytest.approx((num / den) ** 0.5, rel=1e-3)


def test_extract_refusals(tiny_sd1, tiny_sdxl, tmp_path, cli):
    dst = tmp_path / "x.safetensors"
    for args, needle in [((tiny_sd1, tiny_sd1, dst, "--rank", 2), "nothing to extract"),
                         ((tiny_sdxl, tiny_sd1, dst, "--rank", 2), "sdxl"),
                         ((tiny_sd1, tiny_sd1, dst, "--rank", 0), "at least 1"),
                         ((tiny_sd1, tiny_sd1, tmp_path / "x.pt", "--rank", 2), ".safetensors")]:
        code, out, err = cli("lora", "extract", *args)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not dst.exists()

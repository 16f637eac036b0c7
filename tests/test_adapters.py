"""DoRA, LoHa and LoKr beside LoRA: what trains, the files, and readers that are not ours computing the same
weights from them (peft's own merge, lycoris-lora's LyCORIS reader, diffusers' load_lora_weights)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conceptor import api
from conceptor.config import build_config
from conceptor.errors import ConceptorError
from conceptor.formats import lycoris
from conceptor.formats.lora import apply_lora_to, convert_lora, lora_from_peft, read_lora, write_lora
from conceptor.models.adapters import add_adapters
from conceptor.models.load import load_components

KINDS = ("dora", "loha", "lokr")
TOL = 1e-5


def adapter_config(model, images, output, kind, method="dreambooth", steps=4, **lora):
    section = {"dreambooth": {"instance_prompt": "a photo of sks toy"}, "finetune": {},
               "pivotal": {"token": "<t>", "init_token": "toy", "instance_prompt": "a photo of <t>"}}[method]
    data = {"dataset": str(images)} if method == "finetune" else {"images": str(images)}
    return build_config(method, None, {
        "model": {"model": str(model)}, "data": data, "optim": {"lr": 1e-3},
        "train": {"output": str(output), "steps": steps, "batch_size": 1, "log_every": 1, "checkpoint_every": 0},
        method: section, "lora": {"adapter": kind, "rank": 2, **lora}})


def _randomised(model, kind, sdxl=False, **shape):
    """A model with adapters of ``kind`` on UNet and text encoder(s), every adapter value random (not the
    zero-update init), so a reader that drops or misreads any factor shows."""
    c = load_components(model)
    modules = {"unet": c.unet, "text_encoder": c.text_encoder}
    if sdxl:
        modules["text_encoder_2"] = c.text_encoder_2
    cfg = SimpleNamespace(adapter=kind, rank=2, alpha=3.0, targets="attn-ff", init_from=None,
                          lokr_factor=shape.get("lokr_factor", -1), lokr_decompose_both=shape.get("both", False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for group in add_adapters(modules, cfg, None, 0):
            for p in group["params"]:  # DoRA's magnitude: positive norms
                noise = torch.rand(p.shape, generator=g) + 0.5 if p.ndim == 1 else torch.randn(p.shape, generator=g) / 4
                p.copy_(noise)
    lora = {}
    for name, m in modules.items():
        lora.update(lora_from_peft(m, name))
    return c, modules, lora


def _peft_merged(modules) -> dict[str, torch.Tensor]:
    """Each adapted Linear weight as peft itself merges it."""
    out = {}
    for prefix, m in modules.items():
        for name, layer in m.named_modules():
            if hasattr(layer, "base_layer") and hasattr(layer, "merge"):
                layer.merge()
                out[f"{prefix}.{name}"] = layer.base_layer.weight.detach().clone()
    return out


def _weights(modules) -> dict[str, torch.Tensor]:
    return {f"{p}.{n}": w.detach() for p, m in modules.items() for n, w in m.named_parameters()}


def _lycoris_merged(path, model, sdxl=False) -> dict[str, torch.Tensor]:
    """lycoris-lora's reader (get_module + make_module + merge_to) on our file: it matches module names as
    ``lycoris_<path>``, so the file's ``lora_`` prefix is renamed and the modules hang where kohya's names say."""
    from lycoris.wrapper import create_lycoris_from_weights

    c = load_components(model)
    root = torch.nn.Module()
    root.unet = c.unet
    encoders = (("te1", c.text_encoder), ("te2", c.text_encoder_2)) if sdxl else (("te", c.text_encoder),)
    for attr, te in encoders:
        if te is not None:
            holder = te
            if not hasattr(te, "text_model"):  # kohya names keep CLIP's text_model level (transformers 5's
                holder = torch.nn.Module()     # CLIPTextModel has none)
                holder.text_model = te
            setattr(root, attr, holder)
    sd = {k.replace("lora_", "lycoris_", 1): v for k, v in load_file(str(path)).items()}
    network, _ = create_lycoris_from_weights(1.0, None, root, weights_sd=sd)
    assert len(network.loras) == len({k.split(".")[0] for k in sd}), "lycoris left layers of our file out"
    for module in network.loras:
        module.merge_to(1.0)
    modules = {"unet": c.unet, "text_encoder": c.text_encoder}
    if sdxl:
        modules["text_encoder_2"] = c.text_encoder_2
    return _weights(modules)


@pytest.mark.parametrize("kind", KINDS)
def test_our_merge_equals_peft_and_lycoris(tiny_sd1, tmp_path, kind):
    _, modules, lora = _randomised(tiny_sd1, kind, lokr_factor=4 if kind == "lokr" else -1)
    assert {lycoris.kind_of(layer) for layer in lora.values()} == {kind}
    mine = load_components(tiny_sd1)
    mine_modules = {"unet": mine.unet, "text_encoder": mine.text_encoder}
    assert apply_lora_to(lora, mine_modules) == len(lora)
    ours = _weights(mine_modules)
    peft = _peft_merged(modules)
    assert len(peft) == len(lora)
    for name, w in peft.items():
        torch.testing.assert_close(ours[name + ".weight"], w, atol=TOL, rtol=0)
    path = write_lora(lora, tmp_path / f"{kind}.safetensors", "kohya")
    theirs = _lycoris_merged(path, tiny_sd1)
    changed = 0
    for name, w in theirs.items():
        torch.testing.assert_close(ours[name], w, atol=TOL, rtol=0)
        changed += not torch.equal(w, _weights({"unet": load_components(tiny_sd1).unet})[name]) \
            if name.startswith("unet.") and name.endswith(".weight") and "attn1.to_q" in name else 0
    assert changed  # the reader did change the weights (not two unchanged models compared)


def test_sdxl_lokr_both_factored_reads_in_lycoris(tiny_sdxl, tmp_path):
    _, modules, lora = _randomised(tiny_sdxl, "lokr", sdxl=True, both=True)
    assert any(n.startswith("text_encoder_2.") for n in lora)
    mine = load_components(tiny_sdxl)
    mine_modules = {"unet": mine.unet, "text_encoder": mine.text_encoder, "text_encoder_2": mine.text_encoder_2}
    apply_lora_to(lora, mine_modules)
    path = write_lora(lora, tmp_path / "xl.safetensors", "kohya")
    keys = set(safe_open(str(path), "pt").keys())
    assert any(k.startswith("lora_te2_") for k in keys) and any(k.startswith("lora_te1_") for k in keys)
    theirs, ours = _lycoris_merged(path, tiny_sdxl, sdxl=True), _weights(mine_modules)
    for name, w in theirs.items():
        torch.testing.assert_close(ours[name], w, atol=TOL, rtol=0)


def test_dora_file_loads_in_diffusers_and_peft(tiny_sd1, tmp_path):
    """diffusers' load_lora_weights + fuse_lora gives our UNet weights. Its text-encoder path (transformers 5.23's
    load_adapter) leaves DoRA magnitudes at their initial norms, an upstream loss: the text-encoder part is read
    by peft's own set_peft_model_state_dict instead, which takes them."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    _, _, lora = _randomised(tiny_sd1, "dora")
    path = write_lora(lora, tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    assert any(k.endswith(".lora_magnitude_vector") for k in safe_open(str(path), "pt").keys())
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    mine = load_components(tiny_sd1)
    apply_lora_to(lora, {"unet": mine.unet, "text_encoder": mine.text_encoder})
    theirs, ours = dict(pipe.unet.named_parameters()), dict(mine.unet.named_parameters())
    assert theirs.keys() == ours.keys()
    for name, w in ours.items():
        torch.testing.assert_close(theirs[name].detach(), w.detach(), atol=TOL, rtol=0)
    te = load_components(tiny_sd1).text_encoder
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                        "out_proj"]), te)
    file = load_file(str(path))
    part = {k[len("text_encoder.text_model."):]: v for k, v in file.items() if k.startswith("text_encoder.")}
    assert not set_peft_model_state_dict(te, part).unexpected_keys
    for layer in te.modules():
        if hasattr(layer, "merge") and hasattr(layer, "base_layer"):
            layer.merge()
    merged = {n.replace(".base_layer", ""): p for n, p in te.named_parameters() if "lora_" not in n}
    assert merged.keys() == dict(mine.text_encoder.named_parameters()).keys()
    for name, w in mine.text_encoder.named_parameters():
        torch.testing.assert_close(merged[name].detach(), w.detach(), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_layouts_convert_both_ways_without_changing_the_update(tiny_sd1, tmp_path, kind):
    _, _, lora = _randomised(tiny_sd1, kind)
    src = write_lora(lora, tmp_path / "a.safetensors", "kohya")
    if kind == "dora":  # diffusers reads DoRA: there and back
        back = convert_lora(convert_lora(src, tmp_path / "d.safetensors", "diffusers"), tmp_path / "k.safetensors",
                            "kohya")
    else:  # diffusers has no LoHa/LoKr layout: refused, nothing written
        with pytest.raises(ConceptorError, match="diffusers loads no"):
            convert_lora(src, tmp_path / "d.safetensors", "diffusers")
        assert not (tmp_path / "d.safetensors").exists()
        back = src
    again = read_lora(back)
    assert again.keys() == lora.keys()
    for name, layer in lora.items():
        w = torch.randn(*lycoris.shape_of(layer))
        torch.testing.assert_close(lycoris.delta(again[name], w), lycoris.delta(layer, w), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_dreambooth_trains_only_the_adapter(tiny_sd1, concept_images, tmp_path, kind):
    base = load_components(tiny_sd1)
    extra = {"lokr_factor": 4} if kind == "lokr" else {}
    result = api.train(adapter_config(tiny_sd1, concept_images, tmp_path / "run", kind, text_encoder=True, **extra))
    path = result.output / "pytorch_lora_weights.safetensors"
    lora = read_lora(path)
    assert {lycoris.kind_of(layer) for layer in lora.values()} == {kind}
    assert any(n.startswith("text_encoder.") for n in lora) and any(n.startswith("unet.") for n in lora)
    keys = set(safe_open(str(path), "pt").keys())
    marker = {"dora": ".lora_magnitude_vector", "loha": ".hada_w2_b", "lokr": ".lokr_w2"}[kind]
    assert any(marker in k for k in keys)
    assert all(k.startswith("lora_") for k in keys) == (kind != "dora")  # LoHa/LoKr: the LyCORIS layout
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    algo = json.loads(meta["ss_network_args"])["algo"]
    assert algo == ("lora" if kind == "dora" else kind) and meta["ss_network_module"] == "lycoris.kohya"
    # the update trained (LoHa/LoKr/DoRA all start at exactly zero update) and the base stayed the base
    w = base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    layer = lora["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert float(lycoris.delta(layer, w).abs().max()) > 0
    model = api.load(str(tiny_sd1), loras=[str(result.output)])
    merged = model.components.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    torch.testing.assert_close(merged, w + lycoris.delta(layer, w), atol=TOL, rtol=0)
    assert model.generate("a photo of sks toy", steps=2, width=64, height=64)[0].size == (64, 64)


def test_sdxl_loha_trains_both_text_encoders(tiny_sdxl, concept_images, tmp_path):
    result = api.train(adapter_config(tiny_sdxl, concept_images, tmp_path / "xl", "loha", steps=2, text_encoder=True))
    path = result.output / "pytorch_lora_weights.safetensors"
    prefixes = {k.split("_", 2)[1] for k in safe_open(str(path), "pt").keys()}
    assert prefixes == {"unet", "te1", "te2"}  # kohya's SDXL names: lora_unet_, lora_te1_, lora_te2_
    lora = read_lora(path)
    assert {n.split(".")[0] for n in lora} == {"unet", "text_encoder", "text_encoder_2"}
    model = api.load(str(tiny_sdxl), loras=[str(path)])
    assert model.generate("a photo of sks toy", steps=2, width=64, height=64)[0].size == (64, 64)


def test_loha_resume_equals_uninterrupted(tiny_sd1, concept_images, tmp_path):
    api.train(adapter_config(tiny_sd1, concept_images, tmp_path / "a", "loha", steps=6))
    cfg = adapter_config(tiny_sd1, concept_images, tmp_path / "b", "loha", steps=3)
    cfg.train.checkpoint_every = 3
    api.train(cfg)
    cfg = adapter_config(tiny_sd1, concept_images, tmp_path / "b", "loha", steps=6)
    cfg.train.resume = "latest"
    api.train(cfg)
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_finetune_lokr_and_pivotal_loha(tiny_sd1, concept_images, tmp_path):
    captioned = tmp_path / "captioned"
    captioned.mkdir()
    for i, image in enumerate(sorted(concept_images.glob("*.png"))):
        (captioned / image.name).write_bytes(image.read_bytes())
        (captioned / image.name).with_suffix(".txt").write_text(f"a toy, picture {i}")
    api.train(adapter_config(tiny_sd1, captioned, tmp_path / "ft", "lokr", method="finetune", steps=2))
    assert {lycoris.kind_of(x) for x in read_lora(tmp_path / "ft" / "pytorch_lora_weights.safetensors").values()} \
        == {"lokr"}
    result = api.train(adapter_config(tiny_sd1, concept_images, tmp_path / "pv", "loha", method="pivotal", steps=2))
    bundles = [p for p in result.files if p.suffix == ".safetensors" and "bundle_emb" in
               "".join(safe_open(str(p), "pt").keys())]
    assert len(bundles) == 1
    keys = set(safe_open(str(bundles[0]), "pt").keys())
    assert any(k.endswith(".hada_w1_a") for k in keys)
    assert {lycoris.kind_of(x) for x in read_lora(bundles[0]).values()} == {"loha"}


def test_init_lora_continues_a_loha_and_refuses_another_kind(tiny_sd1, tmp_path):
    _, _, lora = _randomised(tiny_sd1, "loha")
    src = write_lora(lora, tmp_path / "a.safetensors", "kohya")
    c = load_components(tiny_sd1)
    cfg = SimpleNamespace(adapter="loha", rank=2, alpha=8.0, targets="attn-ff", init_from=str(src), lokr_factor=-1,
                          lokr_decompose_both=False)  # another alpha than the file's: the update is what counts
    add_adapters({"unet": c.unet, "text_encoder": c.text_encoder}, cfg, None, 5)
    started = {**lora_from_peft(c.unet, "unet"), **lora_from_peft(c.text_encoder, "text_encoder")}
    assert started.keys() == lora.keys()
    for name, layer in lora.items():
        torch.testing.assert_close(lycoris.delta(started[name]), lycoris.delta(layer), atol=1e-6, rtol=0)
    c = load_components(tiny_sd1)
    cfg.adapter = "lokr"
    with pytest.raises(ConceptorError, match="pass --adapter loha"):
        add_adapters({"unet": c.unet, "text_encoder": c.text_encoder}, cfg, None, 5)


def test_bad_adapter_input_is_one_line_and_writes_nothing(tiny_sd1, tiny_flux, concept_images, tmp_path, cli):
    base = ["train", "dreambooth", "--model", tiny_sd1, "--images", concept_images, "--instance-prompt", "a sks toy",
            "--steps", "1"]
    cases = [
        (["--adapter", "lokr", "--lokr-factor", "3"], "--lokr-factor 3 does not divide"),
        (["--lora", "--lokr-factor", "4"], "add --adapter lokr"),
        (["--adapter", "lokr", "--lokr-factor", "0"], "--lokr-factor must be"),
        (["--adapter", "boft"], "invalid choice"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, _, err = cli(*base, "--output", out, *extra)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
        assert not out.exists()
    out = tmp_path / "flux"
    code, _, err = cli("train", "dreambooth", "--model", tiny_flux, "--images", concept_images, "--instance-prompt",
                       "a sks toy", "--steps", "1", "--adapter", "loha", "--output", out)
    assert code == 2 and "for SD3/Flux use --adapter lora or dora" in err and not out.exists()


def test_damaged_lycoris_files_are_named(tmp_path):
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    good = {f"{base}.hada_w1_a": torch.randn(8, 2), f"{base}.hada_w1_b": torch.randn(2, 4),
            f"{base}.hada_w2_a": torch.randn(8, 2), f"{base}.hada_w2_b": torch.randn(2, 4),
            f"{base}.alpha": torch.tensor(4.)}
    save_file(good, tmp_path / "good.safetensors")
    layer = read_lora(tmp_path / "good.safetensors")["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    expected = (good[f"{base}.hada_w1_a"] @ good[f"{base}.hada_w1_b"]) * (good[f"{base}.hada_w2_a"] @
                                                                          good[f"{base}.hada_w2_b"]) * 2.0
    torch.testing.assert_close(lycoris.delta(layer), expected)  # alpha 4 / rank 2
    for broken, message in (({f"{base}.hada_w2_b": None}, "lacks hada_w2_b"),
                            ({f"{base}.hada_w2_b": torch.randn(3, 4)}, "do not chain"),
                            ({f"{base}.hada_t1": torch.randn(2, 2, 3, 3)}, "Tucker core"),
                            ({f"{base}.alpha": torch.tensor(-1.)}, "alpha must be positive")):
        bad = {k: v for k, v in {**good, **broken}.items() if v is not None}
        save_file(bad, tmp_path / "bad.safetensors")
        with pytest.raises(ConceptorError, match=message):
            read_lora(tmp_path / "bad.safetensors")
    lora = {f"{base}.lora_down.weight": torch.randn(2, 4), f"{base}.lora_up.weight": torch.randn(8, 2),
            f"{base}.dora_scale": torch.rand(1, 4)}  # input-axis DoRA (LyCORIS < 3): another update, refused
    save_file(lora, tmp_path / "dora.safetensors")
    with pytest.raises(ConceptorError, match="only DoRA over output rows"):
        read_lora(tmp_path / "dora.safetensors")


def test_flux_dora_trains_and_loads(tiny_flux, concept_images, tmp_path):
    """Flux and SD3 take DoRA in diffusers' layout; kohya's fused Flux layout is refused for it in one line."""
    result = api.train(adapter_config(tiny_flux, concept_images, tmp_path / "flux", "dora", steps=2))
    path = result.output / "pytorch_lora_weights.safetensors"
    lora = read_lora(path)
    assert {lycoris.kind_of(x) for x in lora.values()} == {"dora"} and all(n.startswith("transformer.") for n in lora)
    model = api.load(str(tiny_flux), loras=[str(path)])
    name, layer = next(iter(lora.items()))
    module = dict(model.components.transformer.named_modules())[name.partition(".")[2]]
    base = dict(load_components(tiny_flux).transformer.named_modules())[name.partition(".")[2]]
    torch.testing.assert_close(module.weight, base.weight + lycoris.delta(layer, base.weight), atol=TOL, rtol=0)
    with pytest.raises(ConceptorError, match="only a plain LoRA survives"):
        convert_lora(path, tmp_path / "k.safetensors", "kohya")
    assert not (tmp_path / "k.safetensors").exists()

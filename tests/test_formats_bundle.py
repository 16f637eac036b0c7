"""Bundled LoRA files (A1111/Forge pivotal tuning): one kohya LoRA file that carries its embeddings."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conceptor.errors import ConceptorError
from conceptor.formats.bundle import read_bundle, write_bundle
from conceptor.formats.embeddings import Embedding, read_embedding, read_embeddings
from conceptor.formats.lora import read_lora, write_lora

_ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


def _lora() -> dict:
    """A few layers shaped like the tiny SD1 UNet's (32 channels) and CLIP text encoder (hidden 32)."""
    g = torch.Generator().manual_seed(0)
    return {f"unet.{_ATTN}.to_q": (torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)),
            f"unet.{_ATTN}.to_out.0": (torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)),
            "text_encoder.encoder.layers.0.self_attn.q_proj": (torch.randn(2, 32, generator=g),
                                                               torch.randn(32, 2, generator=g))}


def _sd1(token="<cat>") -> Embedding:
    return Embedding(token, torch.randn(2, 32))


def _sdxl(token="<cat>") -> Embedding:
    return Embedding(token, torch.randn(2, 32), torch.randn(2, 64))


def _keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _same_lora(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


@pytest.mark.parametrize("make", [_sd1, _sdxl])
def test_round_trip_and_a1111_key_names(tmp_path, make):
    lora, embs = _lora(), [make("<cat>"), make("dog-toy")]
    path = write_bundle(lora, embs, tmp_path / "b.safetensors")
    back_lora, back = read_bundle(path)
    assert _same_lora(back_lora, read_lora(write_lora(lora, tmp_path / "k.safetensors", "kohya")))
    assert [e.token for e in back] == ["<cat>", "dog-toy"]
    for e, b in zip(embs, back):
        assert torch.equal(b.vectors, e.vectors)
        assert (b.vectors_2 is None) == (e.vectors_2 is None)
        assert e.vectors_2 is None or torch.equal(b.vectors_2, e.vectors_2)
    keys = _keys(path)
    bundled = {k for k in keys if k.startswith("bundle_emb.")}
    parts = ["string_to_param.*"] if make is _sd1 else ["clip_l", "clip_g"]
    assert bundled == {f"bundle_emb.{t}.{p}" for t in ("<cat>", "dog-toy") for p in parts}
    assert keys - bundled == _keys(tmp_path / "k.safetensors")  # the rest is exactly write_lora's kohya file
    assert f"lora_unet_{_ATTN.replace('.', '_')}_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "bundle_emb": "<cat>,dog-toy"}
    # as A1111's networks.py splits the keys: the token, then string_to_param.* or clip_l/clip_g
    assert {k.split(".", 2)[1] for k in bundled} == {"<cat>", "dog-toy"}


def test_read_lora_on_a_bundle_is_the_plain_lora(tmp_path):
    lora = _lora()
    bundle = write_bundle(lora, [_sd1()], tmp_path / "b.safetensors")
    plain = write_lora(lora, tmp_path / "k.safetensors", "kohya")
    assert _same_lora(read_lora(bundle), read_lora(plain))
    assert _same_lora(read_lora(bundle), lora)


def test_read_embedding_on_bundles(tmp_path):
    one = _sdxl("<cat>")
    path = write_bundle(_lora(), [one], tmp_path / "one.safetensors")
    back = read_embedding(path)
    assert back.token == "<cat>" and torch.equal(back.vectors, one.vectors) and torch.equal(back.vectors_2,
                                                                                           one.vectors_2)
    assert read_embedding(path, token="<kitty>").token == "<kitty>"  # one embedding: token renames, as elsewhere
    cat, dog = _sd1("<cat>"), _sd1("<dog>")
    path = write_bundle(_lora(), [cat, dog], tmp_path / "two.safetensors")
    with pytest.raises(ConceptorError, match=r"two.safetensors holds 2 embeddings \(tokens: <cat>, <dog>\); "
                                             r"pass FILE:TOKEN") as e:
        read_embedding(path)
    assert "\n" not in str(e.value)
    assert torch.equal(read_embedding(path, token="<dog>").vectors, dog.vectors)
    assert torch.equal(read_embedding(path, token="<cat>").vectors, cat.vectors)
    with pytest.raises(ConceptorError, match="has no embedding <cow> .tokens: <cat>, <dog>"):
        read_embedding(path, token="<cow>")
    every = read_embeddings(path)
    assert [e.token for e in every] == ["<cat>", "<dog>"] and torch.equal(every[1].vectors, dog.vectors)


def test_read_embeddings_of_a_plain_file_is_its_one_embedding(tmp_path):
    from conceptor.formats.embeddings import write_embedding

    e = _sd1()
    (back,) = read_embeddings(write_embedding(e, tmp_path / "e.safetensors", "a1111"))
    assert back.token == "<cat>" and torch.equal(back.vectors, e.vectors)


def test_a1111_flat_keys_written_by_another_tool(tmp_path):
    """A file as other trainers write it: any string_to_param sub-key, a 1-D vector, no metadata."""
    v = torch.randn(32)
    save_file({"bundle_emb.sks.string_to_param.0": v, "lora_unet_x_to_q.lora_down.weight": torch.randn(2, 8),
               "lora_unet_x_to_q.lora_up.weight": torch.randn(8, 2)}, str(tmp_path / "o.safetensors"))
    lora, (e,) = read_bundle(tmp_path / "o.safetensors")
    assert e.token == "sks" and torch.equal(e.vectors, v.unsqueeze(0)) and list(lora) == ["unet.x.to_q"]


@pytest.mark.parametrize("extra,needle", [
    ({"bundle_emb.x.string_to_param.*": torch.zeros(1, 4), "bundle_emb.x.clip_l": torch.zeros(1, 4)},
     r"holds two embeddings for token x \(bundle_emb.x.clip_l, bundle_emb.x.string_to_param.\*\)"),
    ({"bundle_emb.x.string_to_param.*": torch.zeros(1, 4), "bundle_emb.x.string_to_param.a": torch.zeros(1, 4)},
     "holds two embeddings for token x"),
    ({"bundle_emb.x.clip_l": torch.zeros(2, 4), "bundle_emb.x.clip_g": torch.zeros(3, 8)},
     "bundle_emb.x.clip_l holds 2 vector.s. but bundle_emb.x.clip_g 3"),
    ({"bundle_emb.x.clip_l": torch.zeros(2, 4)}, "bundle_emb.x.clip_l has no clip_g"),
    ({"bundle_emb.x.string_to_param.*": torch.zeros(1, 4, dtype=torch.int32)}, "dtype torch.int32"),
    ({"bundle_emb.x.clip_l": torch.zeros(1, 4), "bundle_emb.x.clip_g": torch.full((1, 8), float("nan"))},
     "bundle_emb.x.clip_g holds NaN"),
    ({"bundle_emb.x": torch.zeros(1, 4)}, "bundle_emb.x names no token and part"),
])
def test_bad_bundles_are_one_line_errors_naming_the_file(tmp_path, extra, needle):
    path = tmp_path / "bad.safetensors"
    save_file(write_lora_tensors() | extra, str(path))
    for read in (read_bundle, read_embedding, read_embeddings):
        with pytest.raises(ConceptorError, match=needle) as e:
            read(path)
        assert "bad.safetensors" in str(e.value) and "\n" not in str(e.value)
    assert list(read_lora(path)) == ["unet.x.to_q"]  # the LoRA part stays readable on its own


def write_lora_tensors() -> dict:
    return {"lora_unet_x_to_q.lora_down.weight": torch.ones(2, 8), "lora_unet_x_to_q.lora_up.weight": torch.ones(8, 2),
            "lora_unet_x_to_q.alpha": torch.tensor(1.0)}


def test_embeddings_only_bundle(tmp_path):
    e = _sd1()
    save_file({"bundle_emb.<cat>.string_to_param.*": e.vectors}, str(tmp_path / "e.safetensors"))
    assert read_bundle(tmp_path / "e.safetensors")[0] == {}
    assert torch.equal(read_embedding(tmp_path / "e.safetensors").vectors, e.vectors)
    with pytest.raises(ConceptorError, match="holds only bundled embeddings"):
        read_lora(tmp_path / "e.safetensors")


@pytest.mark.parametrize("embs,name,needle", [
    ([_sd1("<cat>"), _sd1("<cat>")], "b.safetensors", "two embeddings have the token <cat>"),
    ([_sd1("a.b")], "b.safetensors", "token 'a.b' cannot be bundled"),
    ([_sd1("<cat>"), _sdxl("<dog>")], "b.safetensors", "mix SDXL"),
    ([Embedding("<cat>", torch.zeros(2, 32), torch.zeros(3, 64))], "b.safetensors", "2 clip_l but 3 clip_g"),
    ([], "b.safetensors", "no embeddings to bundle"),
    ([_sd1()], "b.pt", "written as .safetensors"),
])
def test_write_bundle_refuses(tmp_path, embs, name, needle):
    with pytest.raises(ConceptorError, match=needle):
        write_bundle(_lora(), embs, tmp_path / name)
    assert not (tmp_path / name).exists()


def test_diffusers_loads_the_lora_part(tiny_sd1, tmp_path):
    """diffusers' own kohya converter reads the bundle's LoRA part into a real pipeline, and gives the same
    UNet and text-encoder outputs as the PEFT adapters the LoRA came from."""
    from diffusers import StableDiffusionPipeline

    from conceptor.formats.lora import lora_from_peft
    from conceptor.models.adapters import add_lora

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    add_lora(pipe.unet, 2, None, ["to_q", "to_k", "to_v", "to_out.0"], 0)
    add_lora(pipe.text_encoder, 2, None, ["q_proj", "k_proj", "v_proj", "out_proj"], 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:  # B starts at zero; random B makes the LoRA change something
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora = lora_from_peft(pipe.unet, "unet") | lora_from_peft(pipe.text_encoder, "text_encoder")
    path = write_bundle(lora, [_sd1()], tmp_path / "b.safetensors")

    ids = torch.tensor([[0, 5, 7, 9, 3]])
    x, t = torch.randn(1, 4, 4, 4, generator=g), torch.tensor([10])

    def outputs(p):
        with torch.no_grad():
            cond = p.text_encoder(ids)[0]
            return cond, p.unet(x, t, cond).sample

    want = outputs(pipe)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    base = outputs(fresh)
    fresh.load_lora_weights({k: v for k, v in load_file(str(path)).items() if not k.startswith("bundle_emb.")})
    got = outputs(fresh)
    for w, b, o in zip(want, base, got):
        assert not torch.allclose(w, b, atol=1e-4)  # the LoRA does change both outputs
        torch.testing.assert_close(o, w, atol=1e-5, rtol=1e-5)

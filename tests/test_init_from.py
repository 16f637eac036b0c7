"""Initialising a run from a LoRA or embedding file: the model computes exactly what the file means, and every
mismatch (rank, family, layers, widths) is one ConceptorError line before anything changes."""
from __future__ import annotations

import logging

import pytest
import torch

from conceptor.errors import ConceptorError
from conceptor.formats.embeddings import Embedding, write_embedding, write_embedding_sdxl_diffusers
from conceptor.formats.lora import lora_from_peft, write_lora
from conceptor.models.adapters import TEXT_LORA_TARGETS, UNET_LORA_TARGETS, add_lora
from conceptor.models.init_from import init_embedding_from, init_lora_from
from conceptor.models.load import load_components
from conceptor.models.tiny import build_tiny_pipeline_folder
from conceptor.models.tokens import add_tokens

ATTN = UNET_LORA_TARGETS["attn"]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("init") / "sd1", "sd1")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("init") / "sdxl", "sdxl")


def _randomise_b(module, seed):
    """Give the zero-initialised B matrices values, so the LoRA changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _unet_out(unet):
    g = torch.Generator().manual_seed(3)
    sample, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=context).sample


def _trained(folder, tmp_path, targets=ATTN, text=False):
    """A 'trained' SD1 LoRA (rank 4, alpha 8): its UNet output and the diffusers and kohya files of it."""
    c = load_components(str(folder))
    add_lora(c.unet, 4, 8.0, targets, seed=0)
    _randomise_b(c.unet, 1)
    lora = lora_from_peft(c.unet, "unet")
    if text:
        add_lora(c.text_encoder, 4, 8.0, TEXT_LORA_TARGETS, seed=2)
        _randomise_b(c.text_encoder, 4)
        lora |= lora_from_peft(c.text_encoder, "text_encoder")
    files = [write_lora(lora, tmp_path / f"{to}.safetensors", to) for to in ("diffusers", "kohya")]
    return c, _unet_out(c.unet), files


def _fresh(folder, rank=4, alpha=2.0, targets=ATTN):
    c = load_components(str(folder))
    add_lora(c.unet, rank, alpha, targets, seed=7)
    return c


def test_lora_init_reproduces_the_trained_output(sd1, tmp_path):
    _, expected, files = _trained(sd1, tmp_path)
    base = _unet_out(load_components(str(sd1)).unet)
    assert (expected - base).abs().max() > 1e-2  # the LoRA really changes the output
    for f in files:
        c = _fresh(sd1)  # same rank, alpha 2 instead of 8: B must be rescaled
        assert (_unet_out(c.unet) - base).abs().max() < 1e-6  # a fresh LoRA starts at the base model
        assert init_lora_from({"unet": c.unet}, f, "sd1") == 4 * 2 * 4  # 4 transformer blocks x attn1/attn2 x q/k/v/out
        torch.testing.assert_close(_unet_out(c.unet), expected, atol=1e-5, rtol=0)


def test_text_encoder_layers_load_too(sd1, tmp_path):
    trained, _, (diffusers, kohya) = _trained(sd1, tmp_path, text=True)
    ids = trained.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = trained.text_encoder(ids)[0]
    for f in (diffusers, kohya):
        c = _fresh(sd1)
        add_lora(c.text_encoder, 4, 1.0, TEXT_LORA_TARGETS, seed=9)  # scaling 1/4, not 2
        n = init_lora_from({"unet": c.unet, "text_encoder": c.text_encoder}, f, "sd1")
        assert n == 32 + 2 * 4  # 32 UNet layers + 2 CLIP layers x q/k/v/out
        with torch.no_grad():
            torch.testing.assert_close(c.text_encoder(ids)[0], expected, atol=1e-5, rtol=0)


def test_run_layers_missing_from_the_file_stay_fresh(sd1, tmp_path, caplog):
    _, _, (f, _) = _trained(sd1, tmp_path)
    c = _fresh(sd1, targets=UNET_LORA_TARGETS["attn-ff"])
    ff_b = c.unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2].lora_B["default"].weight
    with caplog.at_level(logging.INFO, logger="conceptor"):
        assert init_lora_from({"unet": c.unet}, f, "sd1") == 32
    assert "32 layers loaded, 8 layers of this run not in it start fresh" in caplog.text  # 4 blocks x 2 ff
    assert torch.count_nonzero(ff_b) == 0


def test_rank_mismatch_is_one_line(sd1, tmp_path):
    _, _, (f, _) = _trained(sd1, tmp_path)
    c = _fresh(sd1, rank=2)
    before = {k: v.clone() for k, v in c.unet.state_dict().items() if "lora_" in k}
    with pytest.raises(ConceptorError, match=r"^diffusers.safetensors has rank 4 but this run trains rank 2: "
                                             r"pass --rank 4$"):
        init_lora_from({"unet": c.unet}, f, "sd1")
    after = c.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # refused before touching anything


def test_uncovered_layers_are_refused(sd1, tmp_path):
    _, _, (f, _) = _trained(sd1, tmp_path, targets=UNET_LORA_TARGETS["attn-ff"])
    c = _fresh(sd1)
    with pytest.raises(ConceptorError, match=r"trains unet\.\S+ff\.net\.\S+ which this run's LoRA does not cover: "
                                             r"match --lora-targets / --lora-text-encoder"):
        init_lora_from({"unet": c.unet}, f, "sd1")


def test_text_encoder_file_on_a_denoiser_only_run(sd1, tmp_path):
    _, _, (f, _) = _trained(sd1, tmp_path, text=True)
    c = _fresh(sd1)
    with pytest.raises(ConceptorError, match=r"trains the text encoder too \(text_encoder\.encoder\.layers\.\d"
                                             r".*add --lora-text-encoder"):
        init_lora_from({"unet": c.unet}, f, "sd1")


def test_sdxl_lora_on_sd1_is_refused(sd1, sdxl, tmp_path):
    x = load_components(str(sdxl))
    add_lora(x.unet, 4, 4.0, ATTN, seed=0)
    f = write_lora(lora_from_peft(x.unet, "unet"), tmp_path / "xl.safetensors")
    c = _fresh(sd1)
    with pytest.raises(ConceptorError, match="another model") as e:
        init_lora_from({"unet": c.unet}, f, "sd1")
    assert "\n" not in str(e.value)


def test_transformer_lora_on_a_unet_is_refused(sd1, tmp_path):
    lora = {"transformer.transformer_blocks.0.attn.to_q": (torch.randn(4, 32), torch.randn(32, 4))}
    f = write_lora(lora, tmp_path / "sd3.safetensors")
    c = _fresh(sd1)
    with pytest.raises(ConceptorError, match=r"^sd3.safetensors: this LoRA was trained for SD3/SD3.5 but the model "
                                             r"is a UNet model"):
        init_lora_from({"unet": c.unet}, f, "sd1")


def test_no_shared_layers_and_no_lora_are_refused(sd1, tmp_path):
    lora = {"unet.nowhere.to_q": (torch.randn(4, 32), torch.randn(32, 4))}
    f = write_lora(lora, tmp_path / "odd.safetensors")
    c = _fresh(sd1)
    with pytest.raises(ConceptorError, match=r"odd.safetensors has none of the 32 layers this run's LoRA trains"):
        init_lora_from({"unet": c.unet}, f, "sd1")
    plain = load_components(str(sd1))
    with pytest.raises(ConceptorError, match="trains no LoRA"):
        init_lora_from({"unet": plain.unet}, f, "sd1")


@pytest.mark.parametrize("fmt", ["diffusers", "a1111", "kohya"])
def test_embedding_layouts_give_the_same_vectors(sd1, tmp_path, fmt):
    c = load_components(str(sd1))
    vectors = torch.randn(2, 32)
    f = write_embedding(Embedding("<cat-toy>", vectors), tmp_path / f"{fmt}.safetensors", fmt)
    token, parts = init_embedding_from(f, None, c.clip_encoders)
    assert token == "<cat-toy>" and len(parts) == 1
    assert parts[0].dtype == torch.float32 and torch.equal(parts[0], vectors)
    assert init_embedding_from(f, "<other>", c.clip_encoders)[0] == "<other>"
    emb = add_tokens(c.tokenizer, c.text_encoder, token, parts[0])  # what the caller does with them
    assert torch.equal(emb.new.detach(), vectors)


def test_embedding_width_mismatch_is_refused(sd1, tmp_path):
    c = load_components(str(sd1))
    f = write_embedding(Embedding("<x>", torch.randn(1, 48)), tmp_path / "wide.safetensors")
    with pytest.raises(ConceptorError, match=r"^wide.safetensors is 48 wide but this model's text encoder is 32: "
                                             r"it was trained for another model family$"):
        init_embedding_from(f, None, c.clip_encoders)


def test_sdxl_embeddings(sd1, sdxl, tmp_path):
    x, c = load_components(str(sdxl)), load_components(str(sd1))
    emb = Embedding("<x>", torch.randn(1, 32), torch.randn(1, 48))
    one_file = write_embedding(emb, tmp_path / "xl.safetensors", "kohya")
    folder = tmp_path / "xl_diffusers"
    folder.mkdir()
    write_embedding_sdxl_diffusers(emb, folder)
    for where in (one_file, folder):
        token, parts = init_embedding_from(where, None, x.clip_encoders)
        assert token == "<x>" and torch.equal(parts[0], emb.vectors) and torch.equal(parts[1], emb.vectors_2)
    with pytest.raises(ConceptorError, match="two text encoders .* but this model has 1 CLIP"):
        init_embedding_from(one_file, None, c.clip_encoders)
    sd1_file = write_embedding(Embedding("<y>", torch.randn(1, 32)), tmp_path / "sd1.safetensors")
    with pytest.raises(ConceptorError, match="one text encoder .* but this model has 2 CLIP"):
        init_embedding_from(sd1_file, None, x.clip_encoders)
    swapped = write_embedding(Embedding("<z>", torch.randn(1, 48), torch.randn(1, 32)), tmp_path / "sw.safetensors",
                              "kohya")
    with pytest.raises(ConceptorError, match="48 wide but this model's text encoder 1 is 32"):
        init_embedding_from(swapped, None, x.clip_encoders)

"""LoRA readers: any bytes give a clean error or a valid LoRA; structured-but-wrong files are named."""
from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conceptor.errors import ConceptorError
from conceptor.formats.lora import read_lora, write_lora


def _valid(tmp_path):
    lora = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (torch.randn(2, 8), torch.randn(8, 2))}
    return write_lora(lora, tmp_path / "ok.safetensors")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512), suffix=st.sampled_from([".safetensors", ".pt", ".bin"]))
def test_fuzz_any_bytes_give_a_clean_answer(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        out = read_lora(path)
    except ConceptorError:
        return
    assert all(d.ndim == 2 and u.ndim == 2 for d, u in out.values())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=400), flip=st.integers(min_value=0, max_value=399))
def test_damaged_valid_files(tmp_path, cut, flip):
    raw = bytearray(_valid(tmp_path).read_bytes())
    raw[flip % len(raw)] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw[: max(0, len(raw) - cut)]))
    try:
        out = read_lora(tmp_path / "bad.safetensors")
    except ConceptorError:
        return
    assert all(d.ndim == 2 for d, _ in out.values())


@pytest.mark.parametrize("tensors,needle", [
    ({"unet.x.lora_A.weight": torch.zeros(2, 4)}, "no up matrix"),
    ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, "no lora_up"),
    ({"unet.x.lora_A.weight": torch.zeros(2, 4), "unet.x.lora_B.weight": torch.zeros(4, 3)}, "do not chain"),
    ({"some.weight": torch.zeros(2)}, "no LoRA weights"),
])
def test_wrong_contents_are_named(tmp_path, tensors, needle):
    save_file(tensors, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConceptorError, match=needle):
        read_lora(tmp_path / "w.safetensors")


def test_lying_header_length(tmp_path):
    raw = _valid(tmp_path).read_bytes()
    (tmp_path / "lie.safetensors").write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    with pytest.raises(ConceptorError, match="not a valid .safetensors"):
        read_lora(tmp_path / "lie.safetensors")


def test_code_pickle_lora_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('x')",))

    torch.save({"unet.x.lora_A.weight": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(ConceptorError, match="NOT loaded"):
        read_lora(tmp_path / "evil.bin")
    assert not (tmp_path / "pwned").exists()

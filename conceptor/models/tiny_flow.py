"""Tiny SD3/SD3.5- and Flux.1-shaped pipeline folders built in code (random weights) for tests and demos.

The same classes, folder layout, model_index.json, VAE scaling/shift factors and scheduler configs as the real
stabilityai/stable-diffusion-3.5 and black-forest-labs/FLUX.1 repositories, with every width shrunk so each
part has at most a few hundred thousand parameters. The width relations the pipelines rely on are kept:
SD3 pads the concatenated CLIP-L + CLIP-G embeddings to the T5 width, so T5 is the widest; Flux packs 2x2
latent patches, so its transformer sees 16 * 4 = 64 channels; rope axes sum to the head width.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from .tiny_tokenizers import DEFAULT_WORDS, write_clip_tokenizer, write_t5_tokenizer

FAMILIES = ("sd3", "flux", "flux-schnell")
RESOLUTION = 32  # pixels: 4x4 latents, 2x2 tokens after SD3's patchify or Flux's packing
VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}  # (scaling_factor, shift_factor) of the real VAEs


def build_tiny_flow_folder(folder: str | Path, family: str, seed: int = 0,
                           words: Iterable[str] = DEFAULT_WORDS) -> Path:
    """Write a random-weight SD3.5-, Flux.1-dev- or Flux.1-schnell-shaped diffusers pipeline folder; return it.

    family: "sd3" (StableDiffusion3Pipeline: CLIP-L + CLIP-G + T5, MMDiT with SD3.5's dual attention and
    qk RMS-norm), "flux" (FluxPipeline, guidance-distilled like FLUX.1-dev) or "flux-schnell" (no guidance
    embedding, timestep-distilled scheduler config). Same seed, same bytes.
    """
    from .load import quiet_libraries

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    quiet_libraries()
    folder = Path(folder)
    words = list(words)
    torch.manual_seed(seed)
    if family == "sd3":
        index = _sd3_parts(folder, words)
    else:
        index = _flux_parts(folder, words, guidance=family == "flux")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "conceptor.json").write_text(json.dumps({"resolution": RESOLUTION}))
    return folder


def _sd3_parts(folder: Path, words: list[str]) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    clip_l, clip_g, t5_width = 32, 48, 96  # real: 768, 1280, 4096; T5 >= L + G, so the CLIP pad is non-empty
    vocab = write_clip_tokenizer(folder / "tokenizer", words)
    write_clip_tokenizer(folder / "tokenizer_2", words)
    t5_vocab = write_t5_tokenizer(folder / "tokenizer_3", words)
    CLIPTextModelWithProjection(_clip_config(vocab, clip_l, "quick_gelu")).save_pretrained(folder / "text_encoder")
    CLIPTextModelWithProjection(_clip_config(vocab, clip_g, "gelu")).save_pretrained(folder / "text_encoder_2")
    _t5(t5_vocab, t5_width).save_pretrained(folder / "text_encoder_3")
    heads, head_dim = 4, 8
    SD3Transformer2DModel(
        sample_size=RESOLUTION // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=t5_width,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=clip_l + clip_g,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).save_pretrained(folder / "transformer")
    _vae("sd3").save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(folder / "scheduler")
    return {
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def _flux_parts(folder: Path, words: list[str], guidance: bool) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    clip_width, t5_width = 32, 64  # real: 768, 4096
    vocab = write_clip_tokenizer(folder / "tokenizer", words)
    t5_vocab = write_t5_tokenizer(folder / "tokenizer_2", words)
    CLIPTextModel(_clip_config(vocab, clip_width, "quick_gelu")).save_pretrained(folder / "text_encoder")
    _t5(t5_vocab, t5_width).save_pretrained(folder / "text_encoder_2")
    FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_width, pooled_projection_dim=clip_width,
        guidance_embeds=guidance, axes_dims_rope=(4, 6, 6),  # real (16, 56, 56): sums to the head width
    ).save_pretrained(folder / "transformer")
    _vae("flux").save_pretrained(folder / "vae")
    if guidance:  # FLUX.1-dev: resolution-dependent shift (SD3 paper, section 5.3.2)
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
    else:  # FLUX.1-schnell's own scheduler_config.json: timestep-distilled, no shift at all
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
    scheduler.save_pretrained(folder / "scheduler")
    return {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def _clip_config(vocab_size: int, hidden: int, act: str):
    """CLIP text tower; OpenAI CLIP-L uses quick_gelu, OpenCLIP bigG uses gelu. Projection as wide as the tower,
    as in both real models."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                          num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77,
                          projection_dim=hidden, hidden_act=act, bos_token_id=vocab_size - 2,
                          eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def _t5(tokenizer_vocab: int, width: int):
    """T5 v1.1 encoder (gated-gelu, untied head). Like the real one (32100 pieces, 32128 rows), the embedding
    has spare rows past the tokenizer's vocabulary: rounded up to a multiple of 128."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=-(-tokenizer_vocab // 128) * 128, d_model=width, d_kv=width // 4, d_ff=2 * width,
        num_layers=2, num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=32, tie_word_embeddings=False, is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _vae(family: str):
    """16-channel KL VAE with 4 blocks (factor 8) and no quant convs, like the SD3 and Flux VAEs."""
    from diffusers import AutoencoderKL

    scaling, shift = VAE_FACTORS[family]
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 16, 16, 16), sample_size=RESOLUTION, scaling_factor=scaling, shift_factor=shift,
        force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

"""Tiny Stable-Diffusion-shaped models built in code (random weights) for tests, benchmarks and demos.

Same classes and folder layout as SD 1.x/2.x, so every loader, trainer and pipeline path runs unchanged
on them; they are just a few hundred thousand parameters. diffusers' own tests use the same trick.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from .tiny_tokenizers import DEFAULT_WORDS, bytes_to_unicode, write_clip_tokenizer, write_t5_tokenizer  # noqa: F401


def build_tiny_pipeline_folder(folder: str | Path, family: str = "sd1", seed: int = 0,
                               words: Iterable[str] = DEFAULT_WORDS) -> Path:
    """Write a random-weight SD1-, SD2-, SDXL-, SD3- or Flux-shaped diffusers pipeline folder and return its path.

    sd1: CLIP-style text encoder (quick_gelu), epsilon prediction.
    sd2: OpenCLIP-style text encoder (gelu), v-prediction: the two things the loader must tell apart.
    sdxl: two text encoders, "text_time" conditioning. sd3, flux, flux-schnell: see ``tiny_flow``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .load import quiet_libraries

    quiet_libraries()
    if family == "sdxl":
        return _build_tiny_sdxl(Path(folder), seed, words)
    if family in ("sd3", "flux", "flux-schnell"):
        from .tiny_flow import build_tiny_flow_folder
        return build_tiny_flow_folder(folder, family, seed, words)
    if family not in ("sd1", "sd2"):
        raise ValueError(f"family must be sd1, sd2, sdxl, sd3, flux or flux-schnell, got {family!r}")
    folder = Path(folder)
    torch.manual_seed(seed)
    vocab_size = write_clip_tokenizer(folder / "tokenizer", words)
    hidden = 32
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=hidden, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=vocab_size, max_position_embeddings=77, projection_dim=hidden,
        hidden_act="quick_gelu" if family == "sd1" else "gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=hidden,
        attention_head_dim=8 if family == "sd1" else (4, 8), use_linear_projection=family == "sd2",
        norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 16, 16, 16), sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    # SD's own scheduler configs: scaled_linear betas, clip_sample False (True wrecks latent sampling).
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type="epsilon" if family == "sd1" else "v_prediction")
    save_pipeline_folder(folder, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=scheduler)
    return folder


def save_pipeline_folder(folder: Path, *, text_encoder, unet, vae, scheduler) -> None:
    """Write the parts (the tokenizer is already in ``folder/tokenizer``) plus SD 1.5's model_index.json."""
    text_encoder.save_pretrained(folder / "text_encoder")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", type(scheduler).__name__], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))


def _build_tiny_sdxl(folder: Path, seed: int, words: Iterable[str]) -> Path:
    """SDXL's layout: two tokenizers and text encoders (the second with a projection: the pooled embedding),
    a UNet with "text_time" added conditioning; the shapes of diffusers' own SDXL tests."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vocab_size = write_clip_tokenizer(folder / "tokenizer", words)
    write_clip_tokenizer(folder / "tokenizer_2", words)

    def te_config(hidden):
        return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                              num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77,
                              projection_dim=hidden, hidden_act="gelu", bos_token_id=vocab_size - 2,
                              eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)

    te1, te2 = CLIPTextModel(te_config(32)), CLIPTextModelWithProjection(te_config(48))
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 48, cross_attention_dim=32 + 48, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 16, 16, 16), sample_size=32, force_upcast=True,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    te1.save_pretrained(folder / "text_encoder")
    te2.save_pretrained(folder / "text_encoder_2")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return folder

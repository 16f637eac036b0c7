"""diffusers -> original LDM/CompVis single-file layout (what AUTOMATIC1111 and ComfyUI load).

The inverse of diffusers' single-file loader, as key-renaming tables derived from the model configs, so
it works for any depth/width of SD1/SD2-shaped models (including the tiny ones in tests).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..fileio import atomic_path

_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
           ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def _unet_prefix_map(config) -> list[tuple[str, str]]:
    """(ldm prefix, diffusers prefix) pairs for the UNet's blocks."""
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("middle_block.1.", "mid_block.attentions.0."),
             ("middle_block.0.", "mid_block.resnets.0."), ("middle_block.2.", "mid_block.resnets.1.")]
    layers = config.layers_per_block
    n = len(config.block_out_channels)
    for i, kind in enumerate(config.down_block_types):
        for j in range(layers):
            ldm = (layers + 1) * i + j + 1
            pairs.append((f"input_blocks.{ldm}.0.", f"down_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in kind:
                pairs.append((f"input_blocks.{ldm}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            pairs.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
    for i, kind in enumerate(config.up_block_types):
        for j in range(layers + 1):
            ldm = (layers + 1) * i + j
            pairs.append((f"output_blocks.{ldm}.0.", f"up_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in kind:
                pairs.append((f"output_blocks.{ldm}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            slot = 2 if "CrossAttn" in kind else 1
            pairs.append((f"output_blocks.{(layers + 1) * i + layers}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for ldm, hf in pairs:
        if key.startswith(hf):
            return ldm + key[len(hf):]
    raise KeyError(key)


def unet_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    pairs = _unet_prefix_map(config)
    out = {}
    for key, value in sd.items():
        new = _rename(key, pairs)
        if ".resnets." in key or new.startswith(("middle_block.0.", "middle_block.2.")):
            for ldm, hf in _RESNET:
                new = new.replace(f".{hf}.", f".{ldm}.")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    n = len(config.block_out_channels)
    pairs = [("encoder.mid.attn_1.", "encoder.mid_block.attentions.0."),
             ("decoder.mid.attn_1.", "decoder.mid_block.attentions.0."),
             ("encoder.norm_out.", "encoder.conv_norm_out."), ("decoder.norm_out.", "decoder.conv_norm_out.")]
    for part in ("encoder", "decoder"):
        for i in range(2):
            pairs.append((f"{part}.mid.block_{i + 1}.", f"{part}.mid_block.resnets.{i}."))
    for i in range(n):
        for j in range(config.layers_per_block):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(config.layers_per_block + 1):
            pairs.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{n - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in sd.items():
        try:
            new = _rename(key, pairs)
        except KeyError:
            new = key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
        if ".mid.attn_1." in new:
            head, tail = new.split(".mid.attn_1.")
            for ldm, hf in attn:
                if tail.startswith(hf):
                    tail = ldm + tail[len(hf):]
                    break
            new = f"{head}.mid.attn_1.{tail}"
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        elif "block." in new or "block_" in new:
            new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD1's text encoder is stored whole under ``cond_stage_model.transformer.text_model.``."""
    out = {}
    for key, value in sd.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    return out


def open_clip_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD2's OpenCLIP layout: fused q/k/v ``in_proj``, ``resblocks``, ``ln_final`` (under cond_stage_model.model.)."""
    sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"]}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    names = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for hf, ldm in names:
            for p in ("weight", "bias"):
                out[f"{dst}{ldm}.{p}"] = sd[f"{src}{hf}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([sd[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"])
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def diffusers_to_ldm(unet, vae, text_encoder, family: str) -> dict[str, torch.Tensor]:
    te = text_encoder.state_dict()
    te = {k: v for k, v in te.items() if "position_ids" not in k}
    text = clip_to_ldm(te) if family == "sd1" else open_clip_to_ldm(te)
    return {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config), **text}


def save_single_file(unet, vae, text_encoder, path: str | Path, family: str, dtype: torch.dtype | None = None) -> Path:
    """Write one ``.safetensors`` in the LDM layout, atomically."""
    from safetensors.torch import save_file

    sd = diffusers_to_ldm(unet, vae, text_encoder, family)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in sd.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"format": "ldm", "family": family})
    return path

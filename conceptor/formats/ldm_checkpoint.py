"""diffusers components -> one ``.safetensors`` in the original CompVis/LDM layout.

That layout (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``) is what
AUTOMATIC1111, ComfyUI and diffusers' own ``from_single_file`` read. The mapping is the inverse of
diffusers' ``single_file_utils`` converters, written as key-prefix tables built from the *state dict
itself* (block counts are read off the keys), so any depth/width of SD1/SD2-shaped model works,
including the tiny test models. Keys we do not know raise instead of being dropped: a checkpoint that
silently lacks weights loads as random noise in other tools.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..errors import ConceptorError
from ..fileio import atomic_path

FAMILIES = ("sd1", "sd2", "sdxl")
Tensors = Mapping[str, torch.Tensor]

# Inner names of a UNet resnet: diffusers ResnetBlock2D -> LDM ResBlock (nn.Sequential indices).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# VAE resnets keep their names except the 1x1 shortcut; the mid attention has its own short names.
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# One OpenCLIP resblock, minus q/k/v which are fused into in_proj (below).
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
# SD2's OpenCLIP-H has 24 blocks but SD2 conditions on the penultimate one, so diffusers' text encoder
# keeps 23 and its loader ignores ``resblocks.23``. We write that block back as all zeros: a zeroed
# pre-LN residual block is an exact identity, so tools that run 24 blocks (with or without skipping the
# last) get the same embedding, and strict loaders find every key a real SD2 file has.
_SD2_FULL_LAYERS = 24


def _indices(sd: Tensors, prefix: str) -> list[int]:
    """Sorted distinct integers that follow ``prefix`` in the keys (block / layer numbers)."""
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix)})


def _has(sd: Tensors, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def _rename_all(sd: Tensors, table: list[tuple[str, str, dict | None]], what: str) -> dict[str, torch.Tensor]:
    """Apply (diffusers prefix, LDM prefix, inner-name map) rows; the first matching prefix wins."""
    out = {}
    for key, value in sd.items():
        for hf, ldm, inner in table:
            if key.startswith(hf):
                rest = key[len(hf):]
                if inner:
                    for a, b in inner.items():  # inner names are whole leading components
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a):]
                            break
                out[ldm + rest] = value
                break
        else:
            raise ConceptorError(f"cannot write {what} weight {key!r} in the LDM single-file layout "
                                 "(only SD1/SD2-shaped models are supported)")
    return out


def _unet_table(sd: Tensors) -> list[tuple[str, str, dict | None]]:
    # LDM numbers input/output blocks consecutively: each level has `layers` resnet(+attention) slots
    # then one down/upsampler slot (none after the last down level / last up level).
    layers = len(_indices(sd, "down_blocks.0.resnets."))
    table = [("time_embedding.linear_1.", "time_embed.0.", None), ("time_embedding.linear_2.", "time_embed.2.", None),
             # SDXL's added conditioning (pooled text + size ids) -> its label embedding MLP
             ("add_embedding.linear_1.", "label_emb.0.0.", None), ("add_embedding.linear_2.", "label_emb.0.2.", None),
             ("conv_in.", "input_blocks.0.0.", None), ("conv_norm_out.", "out.0.", None), ("conv_out.", "out.2.", None),
             ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
             ("mid_block.attentions.0.", "middle_block.1.", None),
             ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    slot = 1
    for i in _indices(sd, "down_blocks."):
        for j in range(layers):
            table.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{slot}.0.", _UNET_RESNET))
            table.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{slot}.1.", None))
            slot += 1
        if _has(sd, f"down_blocks.{i}.downsamplers."):
            table.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{slot}.0.op.", None))
            slot += 1
    slot = 0
    for i in _indices(sd, "up_blocks."):
        n = len(_indices(sd, f"up_blocks.{i}.resnets."))  # layers + 1 in up blocks
        for j in range(n):
            table.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{slot + j}.0.", _UNET_RESNET))
            table.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{slot + j}.1.", None))
        # The upsampler sits in the level's last output block, after the attention when there is one.
        pos = 2 if _has(sd, f"up_blocks.{i}.attentions.") else 1
        table.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{slot + n - 1}.{pos}.", None))
        slot += n
    return table


def unet_to_ldm(sd: Tensors) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys."""
    out = _rename_all(sd, _unet_table(sd), "UNet")
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def vae_to_ldm(sd: Tensors) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict -> ``first_stage_model.*`` keys (decoder levels are numbered in reverse)."""
    table: list[tuple[str, str, dict | None]] = [
        (p, p, None) for p in ("quant_conv.", "post_quant_conv.", "encoder.conv_in.", "encoder.conv_out.",
                               "decoder.conv_in.", "decoder.conv_out.")]
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_norm_out.", f"{part}.norm_out.", None),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTN)]
        table += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.", _VAE_RESNET) for k in range(2)]
    for i in _indices(sd, "encoder.down_blocks."):
        for j in _indices(sd, f"encoder.down_blocks.{i}.resnets."):
            table.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET))
        table.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", None))
    ups = _indices(sd, "decoder.up_blocks.")
    for i in ups:
        level = len(ups) - 1 - i
        for j in _indices(sd, f"decoder.up_blocks.{i}.resnets."):
            table.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{level}.block.{j}.", _VAE_RESNET))
        table.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{level}.upsample.", None))
    out = {}
    for key, value in _rename_all(sd, table, "VAE").items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention projections are 1x1 convolutions
        out["first_stage_model." + key] = value
    return out


def _strip_text_model(sd: Tensors) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` prefix); older ones have it.
    # position_ids is a non-learned buffer; loaders rebuild it.
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}


def clip_to_ldm(sd: Tensors) -> dict[str, torch.Tensor]:
    """SD1: the HF CLIPTextModel is stored as-is under ``cond_stage_model.transformer.text_model.``."""
    return {"cond_stage_model.transformer.text_model." + k: v for k, v in _strip_text_model(sd).items()}


def open_clip_to_ldm(sd: Tensors, prefix: str = "cond_stage_model.model.") -> dict[str, torch.Tensor]:
    """SD2 / SDXL's second encoder: OpenCLIP names under ``prefix``, q/k/v fused into ``attn.in_proj_*``;
    SDXL's projection is OpenCLIP's bare ``text_projection`` matrix ([hidden, proj], the Linear transposed)."""
    sd = _strip_text_model(sd)
    projection = sd.pop("text_projection.weight", None)
    rows: list[tuple[str, str, dict | None]] = [
        ("embeddings.token_embedding.weight", "token_embedding.weight", None),
        ("embeddings.position_embedding.weight", "positional_embedding", None),  # a bare Parameter in OpenCLIP
        ("final_layer_norm.", "ln_final.", None)]
    layers = _indices(sd, "encoder.layers.")
    rows += [(f"encoder.layers.{i}.", f"transformer.resblocks.{i}.", _OPEN_CLIP_LAYER) for i in layers]
    fused = {k: v for k, v in sd.items() if ".self_attn." in k and k.split(".")[-2] in ("q_proj", "k_proj", "v_proj")}
    out = _rename_all({k: v for k, v in sd.items() if k not in fused}, rows, "text encoder")
    for i in layers:
        for p in ("weight", "bias"):
            # nn.MultiheadAttention packs [q; k; v] along dim 0; diffusers' loader splits it back in thirds.
            out[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(
                [fused.pop(f"encoder.layers.{i}.self_attn.{x}_proj.{p}") for x in "qkv"])
    if fused:
        raise ConceptorError(f"cannot write text encoder weights {sorted(fused)[:3]} in the OpenCLIP layout")
    if len(layers) == _SD2_FULL_LAYERS - 1:  # the real SD2 encoder: restore the skipped last block as identity
        last = f"transformer.resblocks.{layers[-1]}."
        for key in [k for k in out if k.startswith(last)]:
            out[f"transformer.resblocks.{_SD2_FULL_LAYERS - 1}." + key[len(last):]] = torch.zeros_like(out[key])
    if projection is not None:
        out["text_projection"] = projection.T.contiguous()
    return {prefix + k: v for k, v in out.items()}


def diffusers_to_ldm(unet_sd: Tensors, vae_sd: Tensors, text_encoder_sd: Tensors,
                     family: str, text_encoder_2_sd: Tensors | None = None) -> dict[str, torch.Tensor]:
    """Pure key mapping of the diffusers state dicts into one LDM-layout state dict (same tensors)."""
    if family not in FAMILIES:
        raise ConceptorError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    if family == "sdxl":
        if text_encoder_2_sd is None:
            raise ConceptorError("an SDXL checkpoint needs both text encoders")
        text = {"conditioner.embedders.0.transformer.text_model." + k: v
                for k, v in _strip_text_model(text_encoder_sd).items()}
        text.update(open_clip_to_ldm(text_encoder_2_sd, prefix="conditioner.embedders.1.model."))
    else:
        text = clip_to_ldm(text_encoder_sd) if family == "sd1" else open_clip_to_ldm(text_encoder_sd)
    return {**unet_to_ldm(unet_sd), **vae_to_ldm(vae_sd), **text}


def _state_dict(part) -> Tensors:
    return part if isinstance(part, Mapping) else part.state_dict()


def save_single_file(unet, vae, text_encoder, path: str | Path, family: str,
                     dtype: torch.dtype | None = None, prediction_type: str = "epsilon",
                     text_encoder_2=None, metadata: dict | None = None) -> Path:
    """Write modules (or their state dicts) as one LDM ``.safetensors``, atomically; returns the path.

    ``dtype`` casts floating-point tensors (e.g. torch.float16 halves the file). Metadata records
    ``format=ldm`` and the family so our own loader need not guess; ``metadata`` (see
    metadata.build_metadata) joins them.
    """
    from safetensors.torch import save_file

    from .metadata import merge_metadata

    sd = diffusers_to_ldm(_state_dict(unet), _state_dict(vae), _state_dict(text_encoder), family,
                          _state_dict(text_encoder_2) if text_encoder_2 is not None else None)
    # safetensors wants contiguous CPU tensors; no copy when they already are (a 2 GB model stays 2 GB).
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in sd.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        own = {"format": "ldm", "family": family, "prediction_type": prediction_type}
        save_file(sd, str(tmp), metadata=merge_metadata(own, metadata))
    return path


def ldm_yaml(unet_config: Mapping, vae_config: Mapping, family: str, prediction_type: str,
             scheduler_config: Mapping) -> str:
    """The original-repo inference config for a checkpoint (v1-inference.yaml / v2-inference-v.yaml shape).

    A1111 reads ``NAME.yaml`` beside ``NAME.safetensors``, and it is the only place the LDM layout can say
    "v-prediction": without it an SD2-768 style model samples as epsilon and gives grey noise. Built from
    the model's own configs, so tiny and custom widths are described correctly too.
    """
    import yaml

    ch = list(unet_config["block_out_channels"])
    base = ch[0]
    down = list(unet_config["down_block_types"])
    # Attention at the resolutions whose down block has cross-attention (1 = full size, 2 = /2, ...).
    attn = [2 ** i for i, kind in enumerate(down) if "CrossAttn" in kind]
    heads = unet_config.get("attention_head_dim") or 8
    unet = {"image_size": int(unet_config.get("sample_size", 64)), "in_channels": unet_config["in_channels"],
            "out_channels": unet_config["out_channels"], "model_channels": base,
            "attention_resolutions": attn, "num_res_blocks": int(unet_config["layers_per_block"]),
            "channel_mult": [c // base for c in ch], "transformer_depth": 1,
            "context_dim": unet_config["cross_attention_dim"], "use_checkpoint": False, "legacy": False}
    if family == "sd2":
        unet.update(num_head_channels=int(heads if isinstance(heads, int) else heads[0]),
                    use_linear_in_transformer=bool(unet_config.get("use_linear_projection", True)))
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"freeze": True, "layer": "penultimate"}}
    else:
        unet["num_heads"] = int(heads if isinstance(heads, int) else heads[0])
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    vch = list(vae_config["block_out_channels"])
    vae = {"embed_dim": vae_config["latent_channels"], "monitor": "val/rec_loss",
           "ddconfig": {"double_z": True, "z_channels": vae_config["latent_channels"],
                        "resolution": int(vae_config.get("sample_size", 256)), "in_channels": vae_config["in_channels"],
                        "out_ch": vae_config["out_channels"], "ch": vch[0], "ch_mult": [c // vch[0] for c in vch],
                        "num_res_blocks": int(vae_config["layers_per_block"]), "attn_resolutions": [],
                        "dropout": 0.0},
           "lossconfig": {"target": "torch.nn.Identity"}}
    params = {"linear_start": float(scheduler_config.get("beta_start", 0.00085)),
              "linear_end": float(scheduler_config.get("beta_end", 0.012)),
              "num_timesteps_cond": 1, "log_every_t": 200,
              "timesteps": int(scheduler_config.get("num_train_timesteps", 1000)),
              "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": unet["image_size"],
              "channels": unet["in_channels"], "cond_stage_trainable": False, "conditioning_key": "crossattn",
              "monitor": "val/loss_simple_ema", "scale_factor": float(vae_config.get("scaling_factor", 0.18215)),
              "use_ema": False,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae},
              "cond_stage_config": cond}
    if prediction_type == "v_prediction":
        params = {"parameterization": "v", **params}
    return yaml.safe_dump({"model": {"base_learning_rate": 1.0e-4,
                                     "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}},
                          sort_keys=False)


def save_single_file_with_yaml(unet, vae, text_encoder, path: str | Path, family: str, prediction_type: str,
                               scheduler_config: Mapping, dtype: torch.dtype | None = None,
                               text_encoder_2=None, metadata: dict | None = None) -> list[Path]:
    """``save_single_file`` plus ``NAME.yaml`` beside it (see ldm_yaml); returns the paths. SDXL gets no
    yaml: A1111 and ComfyUI recognise SDXL checkpoints by their keys."""
    from ..fileio import write_text

    path = save_single_file(unet, vae, text_encoder, path, family, dtype, prediction_type=prediction_type,
                            text_encoder_2=text_encoder_2, metadata=metadata)
    if family == "sdxl":
        return [path]
    side = path.with_suffix(".yaml")
    write_text(side, ldm_yaml(unet.config, vae.config, family, prediction_type, scheduler_config))
    return [path, side]

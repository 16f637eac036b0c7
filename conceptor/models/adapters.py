"""Which weights train: whole modules in fp32, or PEFT adapters (LoRA, DoRA, LoHa, LoKr) on their projections.

Shared by every method that changes the model itself (DreamBooth, fine-tuning): the one place adapters
are added (``add_adapters``), checkpointed (``trained_state``) and written (``save_adapters``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..compat import check_adapter_stack
from ..errors import ConceptorError

# "attn": the attention projections, as diffusers' DreamBooth-LoRA script targets them. "attn-ff" adds
# the transformer blocks' feed-forward layers (kohya's default SD LoRA covers them too): more capacity for
# subjects the base model has never drawn (on the toy world's arrow: fidelity 0.25 -> 0.75 at the same lr).
_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_LORA_TARGETS = {"attn": _ATTENTION, "attn-ff": _ATTENTION + ["ff.net.0.proj", "ff.net.2"]}
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def peft_config(kind: str, rank: int, alpha: float | None, targets: list[str], lokr_factor: int = -1,
                lokr_decompose_both: bool = False):
    """The peft config of one adapter kind. LoRA and DoRA start from Gaussian A and zero B (diffusers' scripts);
    LoHa and LoKr from peft's own init, which also leaves the model exactly equal to the base at step 0."""
    import peft

    alpha = alpha or rank
    if kind == "loha":
        return peft.LoHaConfig(r=rank, alpha=alpha, target_modules=targets)
    if kind == "lokr":
        return peft.LoKrConfig(r=rank, alpha=alpha, target_modules=targets, decompose_factor=lokr_factor,
                               decompose_both=lokr_decompose_both)
    return peft.LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets,
                           use_dora=kind == "dora")


def add_lora(module: torch.nn.Module, rank: int, alpha: float | None, targets: list[str],
             seed: int, kind: str = "lora", lokr_factor: int = -1,
             lokr_decompose_both: bool = False) -> list[torch.nn.Parameter]:
    """Inject an adapter of ``kind`` (the model starts exactly equal to the base) and return its fp32
    parameters. The random init comes from ``seed``, so it is part of the run's reproducible state."""
    check_adapter_stack()  # a peft the libraries refuse fails here in one line, not inside add_adapter
    config = peft_config(kind, rank, alpha, targets, lokr_factor, lokr_decompose_both)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module.add_adapter(config)
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:  # adapters inherit the (maybe half) dtype of the frozen base; masters stay fp32
        p.data = p.data.float()
    return params


LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights(FOLDER) looks for


def _targets_of(name: str, lora, flow, module) -> list[str]:
    if name == "transformer":
        return flow.targets(module, lora.targets)
    return UNET_LORA_TARGETS[lora.targets] if name == "unet" else TEXT_LORA_TARGETS


def add_adapters(modules: dict[str, torch.nn.Module], lora, text_lr: float | None, seed: int,
                 flow=None) -> list[dict]:
    """Adapter param groups for ``{"unet"|"transformer": m, "text_encoder": m, ...}`` as the run's ``lora`` section
    says (``lora.adapter``: lora, dora, loha or lokr): the denoiser on its target set (a flow family's own for a
    transformer), text encoders on their attention projections, each seeded apart (seed, seed+1+k)."""
    groups = []
    kind = getattr(lora, "adapter", "lora")
    shape = {"kind": kind, "lokr_factor": getattr(lora, "lokr_factor", -1),
             "lokr_decompose_both": getattr(lora, "lokr_decompose_both", False)}
    for k, (name, module) in enumerate(modules.items()):
        targets = _targets_of(name, lora, flow, module)
        if name in ("unet", "transformer"):
            groups.append({"params": add_lora(module, lora.rank, lora.alpha, targets, seed, **shape)})
        else:
            group = {"params": add_lora(module, lora.rank, lora.alpha, targets, seed + k, **shape)}
            groups.append({**group, "lr": text_lr} if text_lr else group)
    if getattr(lora, "init_from", None):  # --init-lora: continue from a file instead of the fresh init
        from .init_from import init_lora_from

        init_lora_from(modules, lora.init_from, None)
    return groups


def check_adapters(modules: dict[str, torch.nn.Module], lora, flow=None, quantize: str | None = None) -> None:
    """Refuse, before any folder or weight is touched, an adapter the model's layers cannot take: LoHa/LoKr on
    SD3/Flux (kohya's fused layout cannot carry them), any kind but LoRA on a quantized base (peft's 4/8-bit
    layers take LoRA), and a LoKr factor that does not divide a targeted layer's sizes (peft would quietly
    pick another factor)."""
    kind = getattr(lora, "adapter", "lora")
    if kind == "lora":
        return
    if kind in ("loha", "lokr") and "transformer" in modules:
        raise ConceptorError(f"--adapter {kind} trains SD 1/2/XL models; for SD3/Flux use --adapter lora or dora "
                             "(their kohya layout fuses layers, which a LoHa/LoKr cannot follow)")
    if quantize:
        raise ConceptorError(f"--adapter {kind} cannot train on a --quantize {quantize} base: peft's quantized "
                             "layers take plain LoRA only; use --adapter lora, or leave --quantize out")
    factor = getattr(lora, "lokr_factor", -1)
    if kind != "lokr" or factor <= 0:
        return
    for name, module in modules.items():
        targets = _targets_of(name, lora, flow, module)
        for path, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and any(path == t or path.endswith("." + t) for t in targets):
                bad = [n for n in (layer.out_features, layer.in_features) if n % factor]
                if bad:
                    raise ConceptorError(f"--lokr-factor {factor} does not divide {name}.{path} "
                                         f"({layer.out_features} x {layer.in_features}); give a factor that divides "
                                         "every targeted layer's sizes, or -1 (as square as possible)")


def save_adapters(modules: dict[str, torch.nn.Module], folder: Path, step: int, final: bool,
                  metadata: dict | None = None) -> list[Path]:
    """The trained adapters of every module in one file (``-steps-N`` for a snapshot): diffusers' layout for LoRA
    and DoRA, the LyCORIS one for LoHa/LoKr (diffusers loads neither; A1111, Forge and ComfyUI load both)."""
    from ..formats.lora import default_layout, lora_from_peft, write_lora
    from ..formats.lycoris import kind_of

    lora = {}
    for name, m in modules.items():
        lora.update(lora_from_peft(m, name))
    if final and any(n.startswith("text_encoder") and kind_of(x) == "dora" for n, x in lora.items()):
        # measured with diffusers 0.42 / transformers 5.23 / peft 0.21 (tests/test_adapters.py): the UNet's
        # DoRA loads exactly, the text encoder's magnitudes stay at their initial norms
        logging.getLogger("conceptor").warning(
            "diffusers' load_lora_weights drops a text encoder's DoRA magnitudes (an upstream loss); conceptor and "
            "LyCORIS read them, and `conceptor lora merge` bakes the adapter into a model every tool loads")
    name = LORA_FILE if final else LORA_FILE.replace(".safetensors", f"-steps-{step}.safetensors")
    return [write_lora(lora, Path(folder) / name, default_layout(lora), metadata=metadata)]


def train_whole(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    module.to(torch.float32).requires_grad_(True)
    return list(module.parameters())


def trained_state(modules: dict[str, torch.nn.Module], lora: bool) -> dict[str, torch.Tensor]:
    """``{"unet.<key>": tensor, ...}``: the adapters only for LoRA, else every weight of each module."""
    if lora:
        from peft.utils import get_peft_model_state_dict

        return {f"{name}.{k}": v for name, m in modules.items() for k, v in get_peft_model_state_dict(m).items()}
    return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}


def load_trained_state(modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor], lora: bool) -> None:
    for name, m in modules.items():
        part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        if lora:
            from peft.utils import set_peft_model_state_dict

            bad = list(getattr(set_peft_model_state_dict(m, part), "unexpected_keys", []))
        else:
            result = m.load_state_dict(part, strict=False)
            bad = result.missing_keys + result.unexpected_keys
        if bad or not part:
            raise ConceptorError(f"checkpoint does not match this run's {name} (first mismatch: "
                                 f"{(bad or ['no weights'])[0]}); resume with the same model and flags")


def trainable_text_encoders(c) -> dict[str, torch.nn.Module]:
    """The text encoders a method may train, by their Components name: the CLIP ones (``c.clip_encoders``)."""
    return dict(zip(("text_encoder", "text_encoder_2"), (te for _, te in c.clip_encoders)))

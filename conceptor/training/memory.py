"""Peak GPU memory of a flow-transformer training run (SD3/3.5, Flux.1), estimated before any weight loads.

Parameter counts come from the real diffusers/transformers classes instantiated on the meta device (no
memory, no download) from config dicts; the activations from a per-block formula (``block_bytes``). The
total is the plain sum of the parts below, an upper bound: gradients and optimizer states are counted at
full size alongside the forward's activations. Sizes are bytes; tables print SI gigabytes (1 GB = 1e9).

- weights: frozen parameters and buffers on the GPU in the base dtype; the transformer's block Linears in
  the ``quantize`` format (``QUANT_BYTES``); text encoders only when their outputs are not cached, the VAE
  only when latents are not. Full fine-tuning keeps fp32 masters (under "trainable") and, with a half base
  dtype, the half copies autocast makes of them during a forward.
- trainable, grads: fp32, 4 bytes each. optimizer: AdamW 8 bytes per trainable, 8-bit AdamW 2, Prodigy 16.
- activations: what autograd keeps for backward (``block_bytes``), plus one block's gradients in flight and,
  on a quantized base, one layer's weight dequantized for its matmul.
- overhead: CUDA context and caching-allocator fragmentation (``CUDA_OVERHEAD``), an explicit constant.

Not counted: the no-grad forwards of the text encoders (small, and over before the transformer's), the
dataloader's pinned memory, and the UNet families (sd1/sd2/sdxl), whose activations follow convolution
resolutions rather than a token count.
"""
from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass, field, replace

from ..errors import ConceptorError

GB = 1e9
CUDA_OVERHEAD = 1 * GB  # context ~0.4 GB + allocator fragmentation; a --memory-overhead would set it
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# bytes per quantized weight: nf4 = 4 bits + an 8-bit absmax per 64 weights + an fp32 constant per 256
# absmax (double quantization); int8 and fp8 = 1 byte (their per-row fp32 scale is added per layer).
QUANT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0, "fp8": 1.0}
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}  # AdamW: two moments; Prodigy: also s and x0
KEEP_UNQUANTIZED = ("x_embedder", "context_embedder", "time_text_embed", "pos_embed", "proj_out", "norm_out")

# -- the full-size reference configurations (diffusers' transformer/config.json, transformers' config.json) --
_FLUX = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
         "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
         "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
FLUX_DEV_TRANSFORMER = _FLUX
FLUX_SCHNELL_TRANSFORMER = {**_FLUX, "guidance_embeds": False}
_SD3 = {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
        "out_channels": 16, "attention_head_dim": 64, "joint_attention_dim": 4096, "pooled_projection_dim": 2048}
SD35_LARGE_TRANSFORMER = {**_SD3, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                          "qk_norm": "rms_norm", "pos_embed_max_size": 192}
SD35_MEDIUM_TRANSFORMER = {**_SD3, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                           "qk_norm": "rms_norm", "pos_embed_max_size": 384, "dual_attention_layers": list(range(13))}
SD3_MEDIUM_TRANSFORMER = {**_SD3, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                          "pos_embed_max_size": 192}
_CLIP = {"model_type": "clip_text_model", "vocab_size": 49408, "max_position_embeddings": 77}
CLIP_L = {**_CLIP, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 768, "intermediate_size": 3072,
          "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_L_FLUX = {**CLIP_L, "architectures": ["CLIPTextModel"]}  # Flux takes CLIP-L's pooled output, no projection
CLIP_G = {**_CLIP, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280, "intermediate_size": 5120,
          "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu"}
T5_XXL = {"model_type": "t5", "architectures": ["T5EncoderModel"], "d_model": 4096, "d_ff": 10240, "d_kv": 64,
          "num_heads": 64, "num_layers": 24, "vocab_size": 32128, "feed_forward_proj": "gated-gelu",
          "relative_attention_num_buckets": 32, "is_encoder_decoder": False, "tie_word_embeddings": False}
VAE_16CH = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "use_quant_conv": False, "use_post_quant_conv": False}


@dataclass(frozen=True)
class Architecture:
    """A flow model by its configs: ``family`` "flux" | "sd3", the transformer's diffusers config, the text
    encoders' transformers configs (CLIP-L, CLIP-G, T5 as the family has them) and the VAE's."""

    family: str
    transformer: dict
    text_encoders: tuple = ()
    vae: dict = field(default_factory=lambda: dict(VAE_16CH))
    max_sequence_length: int | None = None  # T5 tokens; None: the pipeline's (Flux-dev 512, schnell and SD3 256)

    @property
    def t5_tokens(self) -> int:
        if self.max_sequence_length is not None:
            return self.max_sequence_length
        return 512 if self.family == "flux" and self.transformer.get("guidance_embeds") else 256


ARCHITECTURES = {
    "flux-dev": Architecture("flux", FLUX_DEV_TRANSFORMER, (CLIP_L_FLUX, T5_XXL)),
    "flux-schnell": Architecture("flux", FLUX_SCHNELL_TRANSFORMER, (CLIP_L_FLUX, T5_XXL)),
    "sd3.5-large": Architecture("sd3", SD35_LARGE_TRANSFORMER, (CLIP_L, CLIP_G, T5_XXL)),
    "sd3.5-medium": Architecture("sd3", SD35_MEDIUM_TRANSFORMER, (CLIP_L, CLIP_G, T5_XXL)),
    "sd3-medium": Architecture("sd3", SD3_MEDIUM_TRANSFORMER, (CLIP_L, CLIP_G, T5_XXL)),
}


@dataclass(frozen=True)
class TrainingPlan:
    """The choices that set the memory of a run; each one a CLI flag (``FLAGS``)."""

    dtype: str = "bf16"  # frozen weights: fp32 | bf16 | fp16
    quantize: str | None = None  # the transformer's block Linears: None | nf4 | int8 | fp8 (LoRA only)
    training: str = "lora"  # lora | full
    rank: int = 16
    targets: tuple[str, ...] | None = None  # LoRA module-name suffixes; None: the family's attention projections
    batch_size: int = 1
    resolution: int | tuple[int, int] = 1024  # pixels: a side, or (height, width)
    gradient_checkpointing: bool = False
    cache_text: bool = False  # text-encoder outputs precomputed: no text encoder on the GPU while training
    cache_latents: bool = False  # latents precomputed: no VAE on the GPU while training
    optimizer: str = "adamw"  # adamw | adamw8bit | prodigy
    overhead: float = CUDA_OVERHEAD

    @property
    def size(self) -> tuple[int, int]:
        r = self.resolution
        return (r, r) if isinstance(r, int) else (int(r[0]), int(r[1]))


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU bytes by part (see the module docstring for what each holds)."""

    weights: float
    trainable: float
    grads: float
    optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.trainable + self.grads + self.optimizer + self.activations + self.overhead

    def parts(self) -> dict[str, float]:
        names = ("weights", "trainable", "grads", "optimizer", "activations", "overhead")
        return {n: getattr(self, n) for n in names} | {"total": self.total}


# -- parameter counts on the meta device ------------------------------------------------------------------
@dataclass(frozen=True)
class Census:
    """A model's stored tensors: ``numel`` (parameters and persistent buffers, what its checkpoint holds),
    ``params`` (parameters only) and its Linear layers as (qualified name, in_features, out_features)."""

    numel: int
    params: int
    linears: tuple[tuple[str, int, int], ...]


@functools.lru_cache(maxsize=32)
def _census(kind: str, config_json: str) -> Census:
    import torch

    config = json.loads(config_json)
    with torch.device("meta"):
        if kind == "text":
            import transformers

            cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
            model = getattr(transformers, config["architectures"][0])(
                transformers.AutoConfig.for_model(config["model_type"], **cfg))
        else:
            import diffusers

            cls = {"flux": diffusers.FluxTransformer2DModel, "sd3": diffusers.SD3Transformer2DModel,
                   "vae": diffusers.AutoencoderKL}[kind]
            model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    linears = tuple((n, m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear))
    params = sum(p.numel() for p in model.parameters())  # each once: T5's tied embedding is one tensor
    stored = set(model.state_dict())
    buffers = sum(b.numel() for name, b in model.named_buffers() if name in stored)  # SD3's position table
    return Census(params + buffers, params, linears)


def census(kind: str, config: dict) -> Census:
    """The ``Census`` of a "flux" | "sd3" transformer, a "vae" or a "text" encoder built from ``config``."""
    return _census(kind, json.dumps(config, sort_keys=True))


def parameter_counts(arch: Architecture) -> dict[str, int]:
    """Stored tensor elements per part: {"transformer", "text_encoder", "text_encoder_2", ..., "vae"}."""
    counts = {"transformer": census(arch.family, arch.transformer).numel}
    for i, te in enumerate(arch.text_encoders):
        counts["text_encoder" + (f"_{i + 1}" if i else "")] = census("text", te).numel
    counts["vae"] = census("vae", arch.vae).numel
    return counts


# -- activations ------------------------------------------------------------------------------------------
# Bytes autograd keeps per token for one block, as (a, b) in a*D + b*F (D the width, F the MLP width), for
# (frozen, half), (frozen, fp32), (full, half), (full, fp32). Frozen half Flux double block, term by term:
# 2D the first LayerNorm's input, 2 x 4D the q and k RMSNorm inputs (upcast to fp32), 4 x 2D attention's
# q, k, v and output, 2D the second LayerNorm's input, 2F the GELU's input: 20D + 2F. Frozen Linears keep
# nothing (a weight that needs no gradient needs no input). SD3's RMSNorm also keeps its half output (+4D);
# the single block has one LayerNorm. Full training adds every Linear's input and the modulations'.
# Counted with torch.autograd.graph.saved_tensors_hooks on diffusers 0.42's blocks (tests/test_memory.py
# recounts them); attention is flash/memory-efficient SDPA (log-sum-exp kept, never the T x T matrix).
_SAVED = {"double": ((20, 2), (32, 4), (40, 4), (64, 8)), "single": ((18, 2), (28, 4), (34, 4), (52, 8)),
          "joint": ((24, 2), (32, 4), (42, 4), (68, 8))}
_DUAL = (20, 24, 28, 40)  # SD3.5-medium's second image attention, bytes per image token per D, same order
_TEXT_STREAM = ("attn.add_", "attn.to_add_out", "ff_context.", "norm1_context.")


def _row(full: bool, half: bool) -> int:
    return 2 * full + (not half)


def lora_input_bytes(kind: str, linears: list[tuple[str, int]], image_tokens: int, text_tokens: int, rank: int,
                     half: bool) -> float:
    """Extra bytes one block keeps for the LoRA on its ``linears`` ([(name in the block, in_features)]).

    A LoRA needs its input for its own gradient. peft casts that input to the adapter's fp32 per layer, so
    with a half base each adapted layer keeps a 4-byte copy of its input (q, k and v three copies); with an
    fp32 base layers that share an input keep it once (Flux's attention output: kept by attention anyway).
    Plus the rank-r product A x (fp32) of each. Tokens: the image or text stream of a double/joint block,
    both for a single block, one per sample for the modulation Linears."""
    total, groups = 0.0, set()
    for name, width in linears:
        if name.startswith(("norm.", "norm1.", "norm1_context.")):
            tokens = 1
        elif kind == "single":
            tokens = image_tokens + text_tokens
        else:
            tokens = text_tokens if name.startswith(_TEXT_STREAM) else image_tokens
        head, _, leaf = name.rpartition(".")
        group = (head + ".qkv" if leaf in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
                 else "attn.qkv" if name == "proj_mlp" else name)
        if name.endswith(("to_out.0", "to_add_out")):
            # Flux's attention output is a view of what attention keeps; SD3's a new tensor of both streams
            group = None if kind != "joint" else head.split(".")[0] + ".out"
            tokens = tokens if half else image_tokens + text_tokens
        if half or (group is not None and group not in groups):
            total += 4 * width * tokens
        groups.add(group)
        total += 4 * rank * tokens
    return total


def block_bytes(kind: str, width: int, mlp_width: int, heads: int, image_tokens: int, text_tokens: int, *,
                half: bool, full: bool, dual: bool = False, lora: float = 0.0) -> float:
    """Bytes one block keeps for backward, per sample: (a D + b F + 12 heads) x tokens from ``_SAVED`` (the
    12 bytes per head: attention's log-sum-exp and the RMSNorm scales), SD3.5-medium's second attention on the
    image tokens, and ``lora`` (``lora_input_bytes``)."""
    a, b = _SAVED[kind][_row(full, half)]
    tokens = image_tokens + text_tokens
    extra = _DUAL[_row(full, half)] * width * image_tokens if dual else 0
    return (a * width + b * mlp_width + 12 * heads) * tokens + extra + lora


def _blocks(arch: Architecture) -> list[tuple[str, str, bool]]:
    """(kind, module-name prefix, dual attention) of each transformer block, in order."""
    t = arch.transformer
    if arch.family == "flux":
        return ([("double", f"transformer_blocks.{i}", False) for i in range(t["num_layers"])]
                + [("single", f"single_transformer_blocks.{i}", False) for i in range(t["num_single_layers"])])
    dual = set(t.get("dual_attention_layers") or ())
    return [("joint", f"transformer_blocks.{i}", i in dual) for i in range(t["num_layers"])]


def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)  # peft's target_modules rule


def activation_bytes(arch: Architecture, plan: TrainingPlan) -> float:
    """Bytes kept for backward at the peak, for the whole batch.

    Tokens: image h/16 x w/16 (SD3: 2x2 patches of /8 latents; Flux: 2x2-packed /8 latents), text: T5's
    ``max_sequence_length`` (SD3: after CLIP's 77). Without gradient checkpointing every block keeps its
    ``block_bytes``; with it each block keeps only its inputs (the two streams, D wide) and one block at a
    time is recomputed in full. Either way one block's gradients are in flight, taken as 4 tensors of D and
    2 of F per token, and outside the blocks the final norm's input, the fp32 loss terms and Flux's rotary
    tables. Without cached latents the VAE encoder's peak (3 tensors of its first width at full resolution)
    comes before the transformer's forward, so the larger of the two counts."""
    t, (h, w) = arch.transformer, plan.size
    s, half, full = DTYPE_BYTES[plan.dtype], plan.dtype != "fp32", plan.training == "full"
    heads = t["num_attention_heads"]
    width = heads * t["attention_head_dim"]
    img = (h // 16) * (w // 16)
    txt = arch.t5_tokens + (77 if arch.family == "sd3" else 0)
    by_block: dict[str, list[tuple[str, int]]] = {}
    if not full:
        targets = plan.targets or _family_targets(arch.family)
        for name, fan_in, _ in census(arch.family, t).linears:
            if _matches(name, targets):
                prefix, local = _split_block(name)
                by_block.setdefault(prefix, []).append((local, fan_in))
    per_block = [block_bytes(kind, width, 4 * width, heads, img, txt, half=half, full=full, dual=dual,
                             lora=lora_input_bytes(kind, by_block.get(prefix, []), img, txt, plan.rank, half))
                 for kind, prefix, dual in _blocks(arch)]
    kept = len(per_block) * s * (img + txt) * width + max(per_block) if plan.gradient_checkpointing \
        else sum(per_block)
    outside = 2 * s * img * width + 3 * 4 * img * t.get("in_channels", 64) * (4 if arch.family == "sd3" else 1)
    if arch.family == "flux":
        outside += 2 * 4 * (img + txt) * t["attention_head_dim"]
    in_flight = s * (img + txt) * (4 * width + 2 * 4 * width)
    denoiser = plan.batch_size * (kept + outside + in_flight)
    vae = 0 if plan.cache_latents else plan.batch_size * 3 * arch.vae["block_out_channels"][0] * h * w * s
    return max(denoiser, vae)


def _split_block(name: str) -> tuple[str, str]:
    parts = name.split(".")
    if parts[0] in ("transformer_blocks", "single_transformer_blocks") and len(parts) > 2:
        return ".".join(parts[:2]), ".".join(parts[2:])
    return "", name


def _family_targets(family: str) -> list[str]:
    from ..families import FAMILIES

    return FAMILIES[family].lora_targets["attn"]


# -- the estimate -----------------------------------------------------------------------------------------
def _check(plan: TrainingPlan) -> None:
    for ok, message in (
        (plan.dtype in DTYPE_BYTES, f"dtype {plan.dtype}: choose fp32, bf16 or fp16"),
        (plan.quantize is None or plan.quantize in QUANT_BYTES, f"--quantize {plan.quantize}: choose nf4, int8 or fp8"),
        (plan.training in ("lora", "full"), f"training {plan.training}: choose lora or full"),
        (plan.quantize is None or plan.training == "lora",
         "--quantize keeps the base frozen: it works with LoRA, not full fine-tuning"),
        (plan.optimizer in OPTIMIZER_BYTES, f"optimizer {plan.optimizer}: choose adamw, adamw8bit or prodigy"),
        (plan.batch_size >= 1 and min(plan.size) >= 16, "batch size and resolution must be positive"),
    ):
        if not ok:
            raise ConceptorError(message)


def estimate_memory(arch: Architecture, plan: TrainingPlan) -> MemoryEstimate:
    """The peak GPU memory of training ``arch`` as ``plan`` says, by part, from configs alone."""
    if arch.family not in ("flux", "sd3"):
        raise ConceptorError(f"the memory estimate covers the flow families (sd3, flux), not {arch.family}")
    _check(plan)
    s, dequantized = DTYPE_BYTES[plan.dtype], 0
    tc = census(arch.family, arch.transformer)
    if plan.training == "full":
        trainable = tc.params
        weights = (tc.numel - tc.params) * s + (tc.params * s if s < 4 else 0)  # buffers; autocast's half copies
    else:
        targets = plan.targets or _family_targets(arch.family)
        trainable = sum(plan.rank * (i + o) for n, i, o in tc.linears if _matches(n, targets))
        weights = tc.numel * s
        if plan.quantize:
            quantized = [(i, o) for n, i, o in tc.linears if n.split(".")[0] not in KEEP_UNQUANTIZED]
            weights -= sum(i * o for i, o in quantized) * (s - QUANT_BYTES[plan.quantize])
            if plan.quantize != "nf4":
                weights += sum(4 * o for _, o in quantized)  # one fp32 scale per output row
            dequantized = max(i * o for i, o in quantized) * s  # the one layer unpacked for its matmul
    if not plan.cache_text:
        weights += sum(census("text", te).numel for te in arch.text_encoders) * s
    if not plan.cache_latents:
        weights += census("vae", arch.vae).numel * s
    return MemoryEstimate(weights=float(weights), trainable=4.0 * trainable, grads=4.0 * trainable,
                          optimizer=float(OPTIMIZER_BYTES[plan.optimizer] * trainable),
                          activations=float(activation_bytes(arch, plan) + dequantized), overhead=float(plan.overhead))


def format_estimate(estimate: MemoryEstimate, budget: float | None = None, title: str | None = None) -> str:
    """A short table, one line per part in GB (1e9 bytes); with ``budget``, whether the total fits."""
    lines = [title] if title else []
    for name, value in estimate.parts().items():
        lines.append(f"  {name:<12}{value / GB:>7.1f} GB")
    if budget is not None:
        verdict = "fits" if estimate.total <= budget else "does not fit"
        lines[-1] += f"   ({verdict} in {budget / GB:.1f} GB)"
    return "\n".join(lines)


# -- fitting a budget -------------------------------------------------------------------------------------
# What a user can change, most harmless first: recomputation and 8-bit moments cost time, not quality;
# quantizing changes the base being trained against; a smaller batch changes the run; a lower resolution
# (tried last) changes what the model learns. (conceptor always caches latents and frozen text: no flags.)
# Each: (flag, whether it applies to a plan, the plan with it).
_MOVES = (
    ("--gradient-checkpointing", lambda p: not p.gradient_checkpointing,
     lambda p: replace(p, gradient_checkpointing=True)),
    ("--mixed-precision bf16", lambda p: p.dtype == "fp32", lambda p: replace(p, dtype="bf16")),
    ("--use-8bit-adam", lambda p: p.optimizer == "adamw", lambda p: replace(p, optimizer="adamw8bit")),
    ("--quantize int8", lambda p: p.training == "lora" and p.quantize is None, lambda p: replace(p, quantize="int8")),
    ("--quantize nf4", lambda p: p.training == "lora" and p.quantize in (None, "int8", "fp8"),
     lambda p: replace(p, quantize="nf4")),
    ("--batch-size 1", lambda p: p.batch_size > 1, lambda p: replace(p, batch_size=1)),
)


@dataclass(frozen=True)
class Fit:
    """The answer of ``fit_budget``: whether ``plan`` fits, the ``flags`` that got it there, its estimate."""

    fits: bool
    flags: tuple[str, ...]
    plan: TrainingPlan
    estimate: MemoryEstimate
    message: str


def apply_flags(plan: TrainingPlan, flags) -> TrainingPlan:
    """``plan`` with CLI ``flags`` applied (as ``fit_budget`` returns them, e.g. "--quantize nf4")."""
    tokens = " ".join(flags).split()
    for i, flag in enumerate(tokens):
        value = tokens[i + 1] if i + 1 < len(tokens) else ""
        if flag == "--gradient-checkpointing":
            plan = replace(plan, gradient_checkpointing=True)
        elif flag == "--mixed-precision":
            plan = replace(plan, dtype="fp32" if value == "no" else value)
        elif flag == "--use-8bit-adam":
            plan = replace(plan, optimizer="adamw8bit")
        elif flag == "--quantize":
            plan = replace(plan, quantize=value)
        elif flag == "--batch-size":
            plan = replace(plan, batch_size=int(value))
        elif flag == "--resolution":
            plan = replace(plan, resolution=int(value))
        elif flag.startswith("--"):
            raise ConceptorError(f"{flag} does not change the memory estimate")
    return plan


def _smallest(arch: Architecture, plan: TrainingPlan, budget: float):
    """The fewest moves (ties: the most harmless) that bring ``plan`` under ``budget``: (flags, plan) or None."""
    moves = [m for m in _MOVES if m[1](plan)]
    for n in range(len(moves) + 1):
        for subset in itertools.combinations(moves, n):
            if sum(flag.startswith("--quantize") for flag, _, _ in subset) > 1:
                continue
            p = plan
            for _, _, apply in subset:
                p = apply(p)
            if estimate_memory(arch, p).total <= budget:
                return tuple(flag for flag, _, _ in subset), p
    return None


def fit_budget(arch: Architecture, plan: TrainingPlan, budget: float) -> Fit:
    """The smallest set of CLI flags under which ``plan`` fits in ``budget`` bytes of GPU memory.

    Tries every combination of ``_MOVES`` by size, the most harmless first; a lower ``--resolution`` (multiples
    of 64 down to 256) only when nothing fits at the plan's own. Says "does not fit" when nothing does."""
    estimate = estimate_memory(arch, plan)
    if estimate.total <= budget:
        return Fit(True, (), plan, estimate, f"fits in {budget / GB:.1f} GB as it is ({estimate.total / GB:.1f} GB)")
    found, side = _smallest(arch, plan, budget), max(plan.size)
    for r in range((side - 1) // 64 * 64, 255, -64):
        if found is not None:
            break
        found = _smallest(arch, replace(plan, resolution=r), budget)
        found = found and (found[0] + (f"--resolution {r}",), found[1])
    if found is None:
        least = replace(plan, resolution=256) if side > 256 else plan
        for flag, ok, apply in _MOVES:
            least = apply(least) if ok(least) and flag != "--quantize int8" else least
        need = estimate_memory(arch, least).total
        return Fit(False, (), plan, estimate, f"does not fit in {budget / GB:.1f} GB: even with every saving at "
                                               f"{max(least.size)} px it needs {need / GB:.1f} GB")
    flags, fitted = found
    fitted_estimate = estimate_memory(arch, fitted)
    return Fit(True, flags, fitted, fitted_estimate,
               f"fits in {budget / GB:.1f} GB ({fitted_estimate.total / GB:.1f} GB) with {' '.join(flags)}")

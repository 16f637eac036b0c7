"""Step time, samples/s and peak memory of each training method, through the real `conceptor.train`.

    python benchmarks/speed.py [--size sd15|sdxl|flux-dev|sd3.5-medium|bundled|tiny|flux-tiny|sd3-tiny]
                               [--variants ti,db-full,db-8bit-ckpt,lora,ft] [--batch-size 1] [--steps 20]
                               [--warmup 5] [--mixed-precision bf16]

`sd15` builds a full-size SD 1.5-architecture model from its config with random weights (speed and memory
do not depend on weight values; nothing is downloaded) at 512 px, `sdxl` SDXL base's at 1024 px: GPU jobs.
`flux-dev` and `sd3.5-medium` build those transformers (and CLIP, T5-XXL, the 16-channel VAE) from the configs
in training/memory.py at 1024 px, random weights; `flow-lora*` variants are their LoRA runs, and the table adds
the preflight estimate (training/preflight.py) beside the measured peak. `bundled` is the toy-world model on
the CPU. Each variant runs in its own subprocess, so peak memory
(torch.cuda.max_memory_allocated on a GPU, peak RSS on the CPU) is its own. Warm-up steps are excluded
from the step time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {  # name -> (method, method section, extra train/optim settings)
    "ti": ("textual-inversion", {"token": "<c>", "init_token": "toy"}, {}),
    "db-full": ("dreambooth", {"instance_prompt": "a photo of sks toy"}, {}),
    "db-8bit-ckpt": ("dreambooth", {"instance_prompt": "a photo of sks toy"},
                     {"gradient_checkpointing": True, "use_8bit_adam": True}),
    "db-prior": ("dreambooth", {"instance_prompt": "a photo of sks toy", "class_prompt": "a photo of a toy",
                                "num_class_images": 4, "class_sampling_steps": 2}, {}),
    "lora": ("dreambooth", {"instance_prompt": "a photo of sks toy", "lora": True, "rank": 4}, {}),
    "ti-compile": ("textual-inversion", {"token": "<c>", "init_token": "toy"}, {"compile": True}),
    "db-compile": ("dreambooth", {"instance_prompt": "a photo of sks toy"}, {"compile": True}),
    "ft": ("finetune", {}, {}),  # full fine-tune on captioned images, latents and text embeddings cached
    "ft-8bit-ckpt": ("finetune", {}, {"gradient_checkpointing": True, "use_8bit_adam": True}),
    "ft-compile": ("finetune", {}, {"compile": True}),
    # Per-variant precision and layout, so fp32, bf16 (CPU: AMX) and NHWC land in one table.
    "ti-bf16": ("textual-inversion", {"token": "<c>", "init_token": "toy"}, {"mixed_precision": "bf16"}),
    "ti-cl": ("textual-inversion", {"token": "<c>", "init_token": "toy"}, {"channels_last": True}),
    "ti-compile-bf16": ("textual-inversion", {"token": "<c>", "init_token": "toy"},
                        {"compile": True, "mixed_precision": "bf16"}),
    "db-prior-bf16": ("dreambooth", {"instance_prompt": "a photo of sks toy", "class_prompt": "a photo of a toy",
                                     "num_class_images": 4, "class_sampling_steps": 2}, {"mixed_precision": "bf16"}),
    "ft-cl": ("finetune", {}, {"channels_last": True}),
    "ft-lora": ("finetune", {"lora": True, "rank": 4}, {}),
    # SD3/Flux: DreamBooth LoRA rank 16 on the attention, as diffusers' Flux/SD3 LoRA scripts' defaults
    "flow-lora": ("dreambooth", {"instance_prompt": "a photo of sks toy", "lora": True, "rank": 16},
                  {"gradient_checkpointing": True}),
    "flow-lora-nf4": ("dreambooth", {"instance_prompt": "a photo of sks toy", "lora": True, "rank": 16},
                      {"gradient_checkpointing": True, "quantize": "nf4"}),
    "flow-lora-fp8": ("dreambooth", {"instance_prompt": "a photo of sks toy", "lora": True, "rank": 16},
                      {"gradient_checkpointing": True, "quantize": "fp8"}),
}
FLOW_SIZES = {"flux-dev": ("flux-dev", "flux"), "sd3.5-medium": ("sd3.5-medium", "sd3")}


def flow_components(name: str, device: str):
    """A full-size Flux.1-dev / SD3.5-medium from its configs with random weights (bf16): speed and memory do
    not depend on the values. Tokenizers are built in code; T5 stays on the CPU as in a run."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
    )

    from conceptor.models.load import Components
    from conceptor.models.tiny import write_clip_tokenizer, write_t5_tokenizer
    from conceptor.training import memory as M

    arch = M.ARCHITECTURES[FLOW_SIZES[name][0]]
    family = arch.family
    work = Path(tempfile.mkdtemp())
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
            transformer = cls.from_config({k: v for k, v in arch.transformer.items() if not k.startswith("_")})
            vae = AutoencoderKL.from_config(M.VAE_16CH)
        encoders = []
        for config in arch.text_encoders:
            if config.get("model_type") == "t5":
                encoders.append(T5EncoderModel(T5Config(**config)))
            else:
                kind = CLIPTextModelWithProjection if "WithProjection" in config["architectures"][0] else CLIPTextModel
                encoders.append(kind(CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"})))
    finally:
        torch.set_default_dtype(torch.float32)
    clips = []
    for i in range(2):
        write_clip_tokenizer(work / f"tok{i}")
        clips.append(CLIPTokenizer.from_pretrained(work / f"tok{i}"))
    write_t5_tokenizer(work / "t5")
    from transformers import AutoTokenizer

    t5_tok = AutoTokenizer.from_pretrained(work / "t5")
    scheduler = ({"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096} if family == "flux" else {"shift": 3.0})
    if family == "flux":
        parts = dict(tokenizer=clips[0], text_encoder=encoders[0], tokenizer_2=t5_tok, text_encoder_2=encoders[1])
    else:
        parts = dict(tokenizer=clips[0], text_encoder=encoders[0], tokenizer_2=clips[1], text_encoder_2=encoders[1],
                     tokenizer_3=t5_tok, text_encoder_3=encoders[2])
    return Components(**parts, vae=vae, unet=None, transformer=transformer, scheduler=None,
                      scheduler_config=scheduler, family=family, prediction_type="flow",
                      source=f"{name}-architecture (random weights)", max_sequence_length=arch.t5_tokens)


def sd15_components(device: str):
    """SD 1.5's architecture (UNet 860M, CLIP ViT-L/14 text encoder, f=8 VAE) from configs, random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from conceptor.models.load import _assemble
    from conceptor.models.tiny import write_clip_tokenizer

    tok_dir = Path(tempfile.mkdtemp()) / "tokenizer"
    write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    with torch.device(device):
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                          hidden_act="quick_gelu", projection_dim=768))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    scheduler = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                 "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon"}
    return _assemble(tokenizer, te, vae, unet, scheduler, "sd15-architecture (random weights)")


def sdxl_components(device: str):
    """SDXL base's architecture (UNet 2.6B, CLIP-L + OpenCLIP-bigG) from configs, random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from conceptor.models.load import _assemble
    from conceptor.models.tiny import write_clip_tokenizer

    tok_dir = Path(tempfile.mkdtemp())
    write_clip_tokenizer(tok_dir / "t1")
    write_clip_tokenizer(tok_dir / "t2")
    with torch.device(device):
        te1 = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         hidden_act="gelu", projection_dim=1280))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=1024, scaling_factor=0.13025, force_upcast=True)
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    scheduler = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                 "prediction_type": "epsilon", "timestep_spacing": "leading"}
    return _assemble(CLIPTokenizer.from_pretrained(str(tok_dir / "t1")), te1, vae, unet, scheduler,
                     "sdxl-architecture (random weights)", CLIPTokenizer.from_pretrained(str(tok_dir / "t2")), te2)


def images(folder: Path, size: int, n: int = 4, captions: bool = False) -> str:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (40, 70, 200))
        ImageDraw.Draw(im).ellipse([size // 6 + i, size // 5, 5 * size // 6, 4 * size // 5 - i], fill=(245, 205, 30))
        im.save(folder / f"{i}.png")
        if captions:  # sidecar captions: a fine-tuning dataset
            (folder / f"{i}.txt").write_text(f"a photo of a yellow circle number {i} on a blue background")
    return str(folder)


def reference(variant: str, size: str, batch: int, steps: int, warmup: int) -> dict:
    """The seeds' recipe (benchmarks/reference_*.py) on the same model, from a folder on disk."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp())
    if size == "sd15":
        from diffusers import DDPMScheduler

        from conceptor.models.tiny import save_pipeline_folder

        c, folder, resolution = sd15_components("cpu"), work / "m", 512
        c.tokenizer.save_pretrained(folder / "tokenizer")
        save_pipeline_folder(folder, text_encoder=c.text_encoder, unet=c.unet, vae=c.vae,
                             scheduler=DDPMScheduler.from_config(c.scheduler_config))
    elif size == "bundled":
        from conceptor import api

        folder, resolution = api.bundled_model_path(), 64
    else:
        from conceptor.models.tiny import build_tiny_pipeline_folder

        folder, resolution = build_tiny_pipeline_folder(work / "m", "sd1"), 32
    inst = sorted(str(p) for p in Path(images(work / "img", resolution)).glob("*.png"))
    cls = sorted(str(p) for p in Path(images(work / "cls", resolution)).glob("*.png"))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if variant in ("ref-db-prior", "ref-ft"):
        from reference_dreambooth import run_reference

        ft = variant == "ref-ft"
        if ft:  # a captioned dataset, as the "ft" variants train on
            inst = sorted(str(p) for p in Path(images(work / "ft", resolution, n=max(4, 2 * batch),
                                                      captions=True)).glob("*.png"))
        captions = {p: Path(p).with_suffix(".txt").read_text() for p in inst} if ft else None
        times = run_reference(str(folder), inst, None if ft else cls, steps + warmup, batch, resolution,
                              lr=1e-5 if ft else 5e-6, device="cuda" if cuda else "cpu", captions=captions)[warmup:]
        samples = batch if ft else 2 * batch
    else:
        from reference_ti import run_reference

        init = "object" if size == "bundled" else "toy"
        times = run_reference(str(folder), inst, "<c>", init, steps + warmup, batch, resolution,
                              device="cuda" if cuda else "cpu")[warmup:]
        samples = batch
    step = sum(times) / len(times)
    return {"variant": variant, "step_ms": 1000 * step, "samples_per_s": samples / step,
            "peak_mb": (torch.cuda.max_memory_allocated() if cuda else
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
            "estimate_mb": None,
            "device": torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()}"}


def child(variant: str, size: str, batch: int, steps: int, warmup: int, precision: str) -> dict:
    import torch

    if variant.startswith("ref-"):
        return reference(variant, size, batch, steps, warmup)
    from conceptor import api
    from conceptor.config import build_config
    from conceptor.models.load import load_components

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp())
    if size == "sd15":
        components, resolution = sd15_components("cuda" if cuda else "cpu"), 512
    elif size == "sdxl":
        components, resolution = sdxl_components("cuda" if cuda else "cpu"), 1024
    elif size in FLOW_SIZES:
        components, resolution = flow_components(size, "cuda" if cuda else "cpu"), 1024
    elif size in ("flux-tiny", "sd3-tiny"):
        from conceptor.models.tiny import build_tiny_pipeline_folder

        components = load_components(str(build_tiny_pipeline_folder(work / "m", size.split("-")[0])))
        resolution = 32
    elif size == "bundled":
        components, resolution = load_components(str(api.bundled_model_path())), 64
    else:
        from conceptor.models.tiny import build_tiny_pipeline_folder

        components, resolution = load_components(str(build_tiny_pipeline_folder(work / "m", "sd1"))), 32
    method, section, extra = VARIANTS[variant]
    if size == "bundled" and method == "textual-inversion":
        section = {**section, "init_token": "object"}  # the toy vocabulary has no "toy"
    extra = dict(extra)
    optim = {"use_8bit_adam": extra.pop("use_8bit_adam", False)}
    key = method.replace("-", "_")
    folder = images(work / "img", resolution, n=max(4, 2 * batch), captions=method == "finetune")
    if method == "finetune":
        section = {**section, "dataset": folder, "cache_dir": str(work / "cache")}
    cfg = build_config(method, None, {
        "data": {"images": folder, "resolution": resolution}, "optim": optim,
        "train": {"output": str(work / "run"), "steps": steps + warmup, "batch_size": batch, "log_every": 1,
                  "checkpoint_every": 0, "mixed_precision": precision, **extra},
        key: section})
    estimate = None
    if components.flow is not None:  # the preflight estimate of this very plan, beside the measured peak
        from conceptor.training import memory as M
        from conceptor.training.preflight import plan_of

        clips = tuple(te.config.to_dict() for _, te in components.clip_encoders)
        arch = M.Architecture(components.family, dict(components.transformer.config), clips,
                              dict(components.vae.config), components.max_sequence_length)
        estimate = M.estimate_memory(arch, plan_of(cfg, arch, resolution)).total / 2**20
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    api.train(cfg, components)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows]
    times = [b - a for a, b in zip(elapsed[warmup - 1:], elapsed[warmup:])]
    step = sum(times) / len(times)
    samples = batch * (2 if "class_prompt" in section else 1)
    return {"variant": variant, "step_ms": 1000 * step, "samples_per_s": samples / step,
            "peak_mb": (torch.cuda.max_memory_allocated() if cuda else
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
            "estimate_mb": estimate,
            "device": torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["sd15", "sdxl", *FLOW_SIZES, "bundled", "tiny", "flux-tiny", "sd3-tiny"],
                    default="bundled")
    ap.add_argument("--variants", default="ti,db-full,db-8bit-ckpt,lora,ft",
                    help="any of " + ",".join(VARIANTS) + ",ref-ti,ref-db-prior,ref-ft (ref-* = the seeds' recipe)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.batch_size, args.steps, args.warmup,
                               args.mixed_precision)))
        return
    import torch

    print(f"{args.size} model, batch {args.batch_size}, {args.mixed_precision} mixed precision, {args.steps} timed "
          f"steps after {args.warmup} warm-up; torch {torch.__version__}, {platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| variant | step (ms) | samples/s | peak memory (MB) | estimate (MB) | device |\n|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--size", args.size, "--batch-size",
                               str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                               "--mixed-precision", args.mixed_precision], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(f"--- {variant} failed:\n{proc.stderr[-4000:]}\n")
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {variant} | failed: {tail[:120]} | | | | |", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        est = "-" if r.get("estimate_mb") is None else f"{r['estimate_mb']:.0f}"
        print(f"| {variant} | {r['step_ms']:.1f} | {r['samples_per_s']:.2f} | {r['peak_mb']:.0f} | {est} | "
              f"{r['device']} |", flush=True)


if __name__ == "__main__":
    main()

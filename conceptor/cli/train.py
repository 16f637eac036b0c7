"""``conceptor train <method>``: flags -> RunConfig (over an optional --config file) -> api.train."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import LORA_TARGET_SETS

# flag dest -> (config section, key). Flags default to None so a config file's value stands unless given.
COMMON = {
    "model": ("model", "model"), "model_config": ("model", "model_config"), "family": ("model", "family"),
    "revision": ("model", "revision"), "variant": ("model", "variant"), "vae": ("model", "vae"),
    "images": ("data", "images"), "resolution": ("data", "resolution"), "center_crop": ("data", "center_crop"),
    "flip_p": ("data", "flip_p"), "repeats": ("data", "repeats"),
    "lr": ("optim", "lr"), "scale_lr": ("optim", "scale_lr"), "lr_scheduler": ("optim", "lr_scheduler"),
    "warmup": ("optim", "warmup"), "weight_decay": ("optim", "weight_decay"),
    "max_grad_norm": ("optim", "max_grad_norm"),
    "output": ("train", "output"), "steps": ("train", "steps"), "batch_size": ("train", "batch_size"),
    "grad_accum": ("train", "grad_accum"), "mixed_precision": ("train", "mixed_precision"),
    "seed": ("train", "seed"), "checkpoint_every": ("train", "checkpoint_every"),
    "checkpoints_limit": ("train", "checkpoints_limit"), "resume": ("train", "resume"),
    "overwrite": ("train", "overwrite"), "validation_prompt": ("train", "validation_prompts"),
    "validation_every": ("train", "validation_every"), "validation_images": ("train", "validation_images"),
    "snr_gamma": ("train", "snr_gamma"), "noise_offset": ("train", "noise_offset"),
    "log_every": ("train", "log_every"), "use_8bit_adam": ("optim", "use_8bit_adam"),
    "gradient_checkpointing": ("train", "gradient_checkpointing"), "ema": ("train", "ema"),
    "ema_decay": ("train", "ema_decay"), "offload_ema": ("train", "offload_ema"), "compile": ("train", "compile"),
    "channels_last": ("train", "channels_last"),
}
TEXTUAL_INVERSION = {
    "token": ("textual_inversion", "token"), "init_token": ("textual_inversion", "init_token"),
    "vectors": ("textual_inversion", "vectors"), "what": ("textual_inversion", "what"),
    "templates": ("textual_inversion", "templates"),
}

DREAMBOOTH = {k: ("dreambooth", k) for k in (
    "instance_prompt", "class_prompt", "class_images", "num_class_images", "prior_loss_weight",
    "class_sampling_steps", "class_guidance", "train_text_encoder", "text_encoder_lr", "lora", "rank", "alpha",
    "lora_targets", "lora_text_encoder", "save_single_file")}
FINETUNE = {k: ("finetune", k) for k in (
    "dataset", "image_column", "caption_column", "skip_bad", "caption_dropout", "buckets", "min_res", "max_res",
    "random_crop", "lora", "rank", "alpha", "lora_targets", "save_single_file", "cache_dir")}


def _flag(p, name, **kw):
    if kw.get("action") == "store_true":
        kw = {**kw, "action": "store_const", "const": True}
    p.add_argument(name, default=None, **kw)


def add_common_flags(p: argparse.ArgumentParser, images: bool = True) -> None:
    g = p.add_argument_group("model")
    _flag(g, "--model", metavar="M", help="hub id, diffusers folder or .safetensors file (default: bundled toy model)")
    _flag(g, "--model-config", metavar="DIR", help="local diffusers folder with configs for a single-file --model")
    _flag(g, "--family", choices=["sd1", "sd2", "sdxl"],
          help="model family of a single-file --model without --model-config")
    _flag(g, "--revision")
    _flag(g, "--variant", help="weights variant, e.g. fp16")
    _flag(g, "--vae", metavar="DIR|ID", help="use this VAE instead of the model's (e.g. madebyollin/sdxl-vae-fp16-fix)")
    g = p.add_argument_group("data")
    if images:
        _flag(g, "--images", metavar="DIR", help="folder of training images (img.txt beside img.png = its caption)")
        _flag(g, "--center-crop", action="store_true", help="crop the centre square before resizing")
    _flag(g, "--resolution", type=int, help="training size in pixels, multiple of 8 (default: the model's)")
    _flag(g, "--flip-p", type=float, help="probability of a horizontal flip (default 0.5; finetune: 0)")
    _flag(g, "--repeats", type=int, help="images x repeats = one shuffled epoch (default 100)")
    g = p.add_argument_group("optimization")
    _flag(g, "--lr", type=float, help="learning rate (default: textual inversion 5e-4, DreamBooth 5e-6, LoRA 1e-4)")
    _flag(g, "--scale-lr", action="store_true", help="multiply lr by batch size x grad accumulation x processes")
    _flag(g, "--lr-scheduler", choices=["constant", "cosine", "linear"])
    _flag(g, "--warmup", type=int, metavar="N", help="linear warm-up steps")
    _flag(g, "--weight-decay", type=float)
    _flag(g, "--max-grad-norm", type=float, help="clip gradients to this norm")
    _flag(g, "--use-8bit-adam", action="store_true", help="bitsandbytes 8-bit AdamW (CUDA; saves optimizer memory)")
    _flag(g, "--ema", action="store_true", help="keep an exponential moving average of the trained weights; "
          "it is saved as the output (raw weights in OUTPUT/raw)")
    _flag(g, "--ema-decay", type=float, help="EMA decay (default 0.9999)")
    _flag(g, "--offload-ema", action="store_true", help="keep the EMA weights in CPU memory")
    g = p.add_argument_group("training")
    _flag(g, "--output", metavar="DIR", help="run folder (default conceptor-output)")
    _flag(g, "--steps", type=int, help="optimizer steps (default 3000)")
    _flag(g, "--batch-size", type=int)
    _flag(g, "--grad-accum", type=int, metavar="N", help="micro-batches per optimizer step")
    _flag(g, "--mixed-precision", choices=["no", "fp16", "bf16"],
          help="frozen weights in fp16/bf16; trainables stay fp32")
    _flag(g, "--seed", type=int)
    _flag(g, "--checkpoint-every", type=int, metavar="N", help="resumable checkpoint every N steps (default 500)")
    _flag(g, "--checkpoints-limit", type=int, metavar="N", help="keep only the newest N checkpoints")
    _flag(g, "--resume", metavar="latest|PATH", help="continue a run from its newest (or a given) checkpoint")
    _flag(g, "--overwrite", action="store_true", help="replace an earlier run in --output")
    g.add_argument("--validation-prompt", action="append", default=None, metavar="P",
                   help="prompt for validation grids (repeatable)")
    _flag(g, "--validation-every", type=int, metavar="N", help="validation grid every N steps (0: start and end only)")
    _flag(g, "--validation-images", type=int, metavar="N", help="images (seeds) per validation prompt")
    _flag(g, "--snr-gamma", type=float, help="min-SNR loss weighting (Hang et al. 2023), e.g. 5.0")
    _flag(g, "--noise-offset", type=float, help="offset noise strength, e.g. 0.05")
    _flag(g, "--log-every", type=int, metavar="N", help="loss log interval in steps")
    _flag(g, "--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    _flag(g, "--compile", action="store_true", help="torch.compile the UNet (faster steps after a one-off compile)")
    _flag(g, "--channels-last", action="store_true",
          help="UNet in channels-last memory layout (NHWC: faster convolutions with oneDNN and tensor cores)")
    _flag(g, "--config", metavar="FILE", help="YAML/TOML config; flags override it")


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="train a concept")
    methods = train.add_subparsers(dest="method", required=True, parser_class=type(train))
    ti = methods.add_parser("textual-inversion", help="learn new token embeddings (model frozen)")
    g = ti.add_argument_group("textual inversion")
    _flag(g, "--token", help="the new placeholder token, e.g. '<cat-toy>'")
    _flag(g, "--init-token", help="one existing word to start from, e.g. toy")
    _flag(g, "--vectors", type=int, metavar="N", help="vectors per token (default 1)")
    _flag(g, "--what", choices=["object", "style"], help="template set (default object)")
    _flag(g, "--templates", metavar="FILE", help="own templates, one per line with {} for the token")
    add_common_flags(ti)
    ti.set_defaults(handler=run, flag_map={**COMMON, **TEXTUAL_INVERSION})

    db = methods.add_parser("dreambooth", help="fine-tune the UNet (or a LoRA) on a subject, with prior preservation")
    g = db.add_argument_group("dreambooth")
    _flag(g, "--instance-prompt", metavar="P", help="prompt of your images with a rare token: 'a photo of sks toy'")
    _flag(g, "--class-prompt", metavar="P", help="the class without the token ('a photo of a toy'): turns on prior "
          "preservation")
    _flag(g, "--class-images", metavar="DIR", help="class images; missing ones are generated here "
          "(default OUTPUT/class_images)")
    _flag(g, "--num-class-images", type=int, metavar="N", help="class images to use (default 100)")
    _flag(g, "--prior-loss-weight", type=float, metavar="F", help="weight of the class loss (default 1.0)")
    _flag(g, "--class-sampling-steps", type=int, metavar="N", help="sampler steps per class image (default 25)")
    _flag(g, "--class-guidance", type=float, metavar="F", help="guidance for class images (default: the model's)")
    _flag(g, "--train-text-encoder", action="store_true", help="fine-tune the text encoder too (full DreamBooth)")
    _flag(g, "--text-encoder-lr", type=float, metavar="F", help="learning rate of the text encoder (default --lr)")
    _flag(g, "--lora", action="store_true", help="train a LoRA of the UNet attention instead of the whole UNet")
    _flag(g, "--rank", type=int, metavar="R", help="LoRA rank (default 4)")
    _flag(g, "--alpha", type=float, metavar="A", help="LoRA alpha (default: the rank)")
    _flag(g, "--lora-targets", choices=LORA_TARGET_SETS,
          help="UNet layers with a LoRA: attention projections (default) or attention + feed-forward")
    _flag(g, "--lora-text-encoder", action="store_true", help="a LoRA of the text encoder too")
    _flag(g, "--save-single-file", action="store_true", help="also write OUTPUT/model.safetensors (A1111/ComfyUI)")
    add_common_flags(db)
    db.set_defaults(handler=run, flag_map={**COMMON, **DREAMBOOTH})

    ft = methods.add_parser("finetune", help="fine-tune the UNet (or a LoRA) on an image-caption dataset")
    g = ft.add_argument_group("fine-tuning")
    _flag(g, "--dataset", metavar="SRC", help="CSV (image_path,caption), folder with metadata.jsonl or .txt "
          "captions, a datasets save_to_disk folder, or a hub dataset name")
    _flag(g, "--image-column", metavar="C")
    _flag(g, "--caption-column", metavar="C")
    _flag(g, "--skip-bad", action="store_true", help="skip (and count) bad rows instead of stopping")
    _flag(g, "--caption-dropout", type=float, metavar="F", help="probability of an empty caption (default 0)")
    _flag(g, "--buckets", action="store_true", help="aspect-ratio buckets instead of square crops")
    _flag(g, "--min-res", type=int, metavar="N", help="smallest bucket side (default resolution/2)")
    _flag(g, "--max-res", type=int, metavar="N", help="largest bucket side (default resolution*2)")
    crop = g.add_mutually_exclusive_group()
    crop.add_argument("--random-crop", action="store_const", const=True, default=None,
                      help="random crops (latents then cannot be cached)")
    crop.add_argument("--center-crop", action="store_const", const=True, default=None, dest="center_crop_ft",
                      help="centre crops (default)")
    _flag(g, "--lora", action="store_true", help="train a LoRA of the UNet attention instead of the whole UNet")
    _flag(g, "--rank", type=int, metavar="R", help="LoRA rank (default 4)")
    _flag(g, "--alpha", type=float, metavar="A", help="LoRA alpha (default: the rank)")
    _flag(g, "--lora-targets", choices=LORA_TARGET_SETS,
          help="UNet layers with a LoRA: attention projections (default) or attention + feed-forward")
    _flag(g, "--save-single-file", action="store_true", help="also write OUTPUT/model.safetensors (+ .yaml)")
    _flag(g, "--cache-dir", metavar="DIR", help="latent/text cache (default ~/.cache/conceptor; 'none' = off)")
    _flag(g, "--epochs", type=int, metavar="N", help="passes over the dataset (sets --steps)")
    add_common_flags(ft, images=False)
    ft.set_defaults(handler=run, flag_map={**COMMON, **FINETUNE, "epochs": ("train", "epochs")})


def config_from_args(args) -> "RunConfig":  # noqa: F821
    from ..config import build_config, read_config_file

    overrides: dict[str, dict] = {}
    for dest, (section, key) in args.flag_map.items():
        overrides.setdefault(section, {})[key] = getattr(args, dest, None)
    file_values = read_config_file(args.config) if args.config else None
    return build_config(args.method, file_values, overrides)


def run(args) -> None:
    from .. import api

    cfg = config_from_args(args)
    if cfg.data.images is None and cfg.method != "finetune":
        from ..errors import ConceptorError

        raise ConceptorError("--images is required: a folder with 3-20 pictures of your concept")
    if cfg.data.images is not None and cfg.dreambooth and cfg.dreambooth.class_images \
            and Path(cfg.dreambooth.class_images).resolve() == Path(cfg.data.images).resolve():
        from ..errors import ConceptorError

        raise ConceptorError("--class-images must be another folder than --images (class images are generic)")
    result = api.train(cfg)
    loss = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
    print(f"done: {result.step} steps, last loss {loss}; outputs in {result.output}")
    for f in result.files:
        print(f"  {f}")

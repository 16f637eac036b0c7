"""``conceptor lora merge|resize|extract``: bake LoRAs into a model, change a LoRA's rank, make one from a fine-tune.

Each prints the relative error it introduces, so a user can choose a rank or a dtype by a number."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("lora", help="merge LoRAs into a model, resize a LoRA, extract one from a fine-tune")
    tools = p.add_subparsers(dest="tool", required=True, parser_class=type(p))

    m = tools.add_parser("merge", help="merge LoRA files into a model and write it as a pipeline folder")
    m.add_argument("model", metavar="MODEL", help="diffusers folder, .safetensors checkpoint or hub id")
    m.add_argument("loras", metavar="LORA[:SCALE]", nargs="+",
                   help="LoRA/DoRA/LoHa/LoKr file (diffusers or kohya) or run folder; :SCALE weights it (default 1)")
    m.add_argument("--output", "-o", required=True, metavar="OUT", help="new folder for the merged pipeline")
    m.add_argument("--save-single-file", action="store_true",
                   help="also write OUT/model.safetensors (+ .yaml), the single file A1111/ComfyUI load (SD 1/2/XL)")
    m.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="precision of the saved denoiser and text encoders (default fp32; fp16 halves the size)")
    m.add_argument("--model-config", metavar="DIR", help="configs for a single-file MODEL")
    m.add_argument("--family", choices=["sd1", "sd2", "sdxl"], help="family of a single-file MODEL")
    m.set_defaults(handler=run_merge)

    r = tools.add_parser("resize", help="truncate a LoRA to a lower rank by SVD (LoHa/LoKr become LoRA)")
    r.add_argument("src", metavar="IN")
    r.add_argument("dst", metavar="OUT")
    r.add_argument("--rank", type=int, required=True, metavar="R")
    r.add_argument("--to", choices=["diffusers", "kohya"], help="layout of OUT (default: the input's)")
    r.set_defaults(handler=run_resize)

    e = tools.add_parser("extract", help="a LoRA from the difference of a fine-tuned model and its base")
    e.add_argument("tuned", metavar="TUNED", help="the fine-tuned model (e.g. a full DreamBooth run folder)")
    e.add_argument("base", metavar="BASE", help="the model it was tuned from")
    e.add_argument("dst", metavar="OUT", help="the LoRA file to write (.safetensors)")
    e.add_argument("--rank", type=int, required=True, metavar="R")
    e.add_argument("--to", choices=["diffusers", "kohya"], default="diffusers", help="layout of OUT")
    e.add_argument("--text-encoder", action="store_true", default=True,
                   help="also extract the CLIP text encoders' changes (default)")
    e.add_argument("--no-text-encoder", dest="text_encoder", action="store_false", help="the denoiser only")
    e.add_argument("--model-config", metavar="DIR", help="configs for single-file models")
    e.set_defaults(handler=run_extract)


def _energy(stats) -> str:
    return (f"kept energy (kept sigma^2 / total, per layer): min {stats.min_kept:.6g}, mean {stats.mean_kept:.6g}\n"
            f"relative error ||dW - dW_R||_F / ||dW||_F over all layers: {stats.relative_error:.6g}")


def run_merge(args) -> None:
    from .. import lora_tools as api

    res = api.merge_loras(args.model, args.loras, args.output, single_file=args.save_single_file, dtype=args.dtype,
                          model_config=args.model_config, family=args.family)
    for name, scale, layers in res.merged:
        print(f"merged {name} x{scale:g}: {layers} layer(s)")
    print(f"relative error of the saved weights ({res.dtype}) over {res.layers} changed layer(s), "
          f"||W_saved - W_exact||_F / ||W_exact - W_base||_F: {res.relative_error:.6g}")
    single = " + model.safetensors" if args.save_single_file else ""
    print(f"wrote {res.output} ({res.family} diffusers pipeline folder{single})")


def run_resize(args) -> None:
    from .. import lora_tools as api

    res = api.resize_lora(args.src, args.dst, args.rank, to=args.to)
    made = " (LoHa/LoKr layers now plain LoRA)" if res.converted else ""
    print(f"wrote {args.dst} ({res.layout}): {len(res.lora)} layer(s), rank {res.input_rank} -> at most "
          f"{res.rank}{made}")
    print(_energy(res.stats))


def run_extract(args) -> None:
    from .. import lora_tools as api

    res = api.extract_lora(args.tuned, args.base, args.dst, args.rank, to=args.to, text_encoder=args.text_encoder,
                           model_config=args.model_config)
    parts = {}
    for name in res.lora:
        parts[name.partition(".")[0]] = parts.get(name.partition(".")[0], 0) + 1
    where = ", ".join(f"{k} {v}" for k, v in parts.items())
    print(f"wrote {args.dst} ({res.layout}): {len(res.lora)} layer(s) extracted ({where}) at rank <= {res.rank}; "
          f"{res.unchanged} unchanged layer(s) left out")
    print(_energy(res.stats))
    if res.not_captured > 1e-6:  # a full fine-tune also moves convolutions and norms, which no LoRA here carries
        print(f"note: {res.not_captured:.1%} of the whole weight difference (Frobenius norm) lies outside these "
              "Linear layers (convolutions, norms, biases) and is not in the LoRA")

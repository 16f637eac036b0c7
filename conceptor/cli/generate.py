"""``conceptor generate``: prompt (+ embeddings) -> PNGs, a grid and generation.json."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate images, optionally with learned embeddings")
    p.add_argument("--model", help="hub id, diffusers folder or .safetensors (default: bundled toy model)")
    p.add_argument("--model-config", metavar="DIR", help="configs for a single-file --model")
    p.add_argument("--family", choices=["sd1", "sd2", "sdxl"], help="family of a single-file --model")
    p.add_argument("--vae", metavar="DIR|ID", help="use this VAE instead of the model's (e.g. an fp16-fixed one)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="textual-inversion file or run folder (repeatable; diffusers, A1111 or kohya format)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA file or run folder, optional scale (default 1.0); repeatable, diffusers or kohya format")
    p.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's, 7.5 for SD, 4 for the bundled one)")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "pndm", "euler", "euler-a", "dpm++"])
    p.add_argument("--seed", type=int, default=0, help="image i uses seed+i (default 0)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--output", default="conceptor-images", metavar="DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="replace images an earlier generate left in --output under the same names")
    p.set_defaults(handler=run)


def run(args) -> None:
    from tqdm.auto import tqdm

    from .. import api
    from ..sampling.pipeline import check_sampling

    # Before the model loads: a typo in a number should cost nothing.
    check_sampling(steps=args.steps, guidance=args.guidance, width=args.width, height=args.height,
                   batch_size=args.batch_size, scheduler=args.scheduler, num_images=args.num_images, seed=args.seed)
    api.check_image_output(args.output, api.image_names(args.num_images, args.seed), args.overwrite)
    model = api.load(args.model, args.embedding, model_config=args.model_config, family=args.family,
                     loras=args.lora, vae=args.vae)
    # The model's own default when not given, resolved here so the PNGs and generation.json say what was used.
    args.guidance = args.guidance if args.guidance is not None else model.default_guidance
    with tqdm(total=args.num_images, desc="generating", unit="img") as bar:
        images = model.generate(args.prompt, negative_prompt=args.negative_prompt, num_images=args.num_images,
                                steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, seed=args.seed,
                                width=args.width, height=args.height, batch_size=args.batch_size,
                                progress=bar.update)
    settings = {k: v for k, v in vars(args).items() if k not in ("handler", "command", "quiet", "overwrite")}
    from pathlib import Path

    paths = api.save_images(images, Path(args.output), settings, overwrite=args.overwrite)
    print(f"wrote {len(images)} image(s) to {args.output}")
    for p in paths:
        print(f"  {p}")

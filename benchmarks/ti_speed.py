"""Textual-inversion speed and memory: conceptor against the seeds' recipe, same model, same machine.

    python benchmarks/ti_speed.py [--steps 30] [--warmup 5] [--batch-size 1] [--size small|tiny]

Each variant runs in its own subprocess so peak RSS is its own. Prints a markdown table.
The "small" model has SD's real 49,408-token vocabulary (the reference keeps all of it in AdamW)
with a scaled-down text encoder and UNet so it runs on a CPU.
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
HERE = Path(__file__).resolve().parent


def build_model(folder: Path, size: str) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptor.models.tiny import DEFAULT_WORDS, build_tiny_pipeline_folder, write_clip_tokenizer

    if size == "tiny":
        return build_tiny_pipeline_folder(folder, "sd1")
    torch.manual_seed(0)
    # Pseudo-words up to SD's vocabulary size, so the embedding matrix is the real 49,408 rows.
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = list(DEFAULT_WORDS)
    i = 0
    while len(words) < 24_300:
        n, w = i, ""
        while True:
            w += letters[n % 26]
            n //= 26
            if n == 0:
                break
        words.append(w + "q")
        i += 1
    vocab = write_clip_tokenizer(folder / "tokenizer", words)
    hidden = 768
    CLIPTextModel(CLIPTextConfig(hidden_size=hidden, intermediate_size=1024, num_attention_heads=12,
                                 num_hidden_layers=4, vocab_size=vocab, max_position_embeddings=77,
                                 bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
                  ).save_pretrained(folder / "text_encoder")
    UNet2DConditionModel(sample_size=8, block_out_channels=(64, 128), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=hidden,
                         attention_head_dim=8, norm_num_groups=32).save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4,
                  norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(folder / "vae")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def make_images(folder: Path, n: int = 5) -> list[str]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        im = Image.new("RGB", (256, 256), (40, 70, 200))
        ImageDraw.Draw(im).ellipse([40 + 8 * i, 50, 200, 210 - 5 * i], fill=(245, 205, 30))
        im.save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


def child(variant: str, model: str, images: str, steps: int, warmup: int, batch: int) -> dict:
    """Runs inside the subprocess: train, return steady-state step time and peak RSS."""
    import torch

    from conceptor.models.load import Components  # noqa: F401  (import cost outside the timing)

    resolution = 64
    if variant == "reference":
        sys.path.insert(0, str(HERE))
        from reference_ti import run_reference

        paths = sorted(str(p) for p in Path(images).glob("*.png"))
        times = run_reference(model, paths, "<concept>", "toy", steps + warmup, batch, resolution)[warmup:]
    else:
        from conceptor import api
        from conceptor.config import build_config

        out = tempfile.mkdtemp()
        cfg = build_config("textual-inversion", None, {
            "model": {"model": model}, "data": {"images": images, "resolution": resolution},
            "train": {"output": out, "steps": steps + warmup, "batch_size": batch, "log_every": 1,
                      "checkpoint_every": 0},
            "textual_inversion": {"token": "<concept>", "init_token": "toy"}})
        api.train(cfg)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        elapsed = [r["elapsed_s"] for r in rows]
        times = [b - a for a, b in zip(elapsed[warmup - 1:], elapsed[warmup:])]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "step_s": sum(times) / len(times), "samples_per_s": batch * len(times) / sum(times),
            "peak_rss_mb": rss_mb, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        v, m, i, s, w, b = args.child
        print(json.dumps(child(v, m, i, int(s), int(w), int(b))))
        return
    work = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    model = build_model(work / "model", args.size)
    make_images(work / "images")
    print(f"built {args.size} model in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    results = {}
    for variant in ("reference", "conceptor"):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, str(model), str(work / "images"),
                               str(args.steps), str(args.warmup), str(args.batch_size)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref, ours = results["reference"], results["conceptor"]
    import torch

    print(f"\nTI on CPU, {args.size} model, batch {args.batch_size}, {args.steps} timed steps after "
          f"{args.warmup} warm-up; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print("| variant | step time (ms) | samples/s | peak RSS (MB) |")
    print("|---|---|---|---|")
    for r in (ref, ours):
        print(f"| {r['variant']} | {1000 * r['step_s']:.1f} | {r['samples_per_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    print(f"| conceptor / reference | {ours['step_s'] / ref['step_s']:.2f}x time | "
          f"{ours['samples_per_s'] / ref['samples_per_s']:.2f}x | {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x |")


if __name__ == "__main__":
    main()

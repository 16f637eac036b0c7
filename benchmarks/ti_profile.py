"""Where one textual-inversion step spends its time, phase by phase, for the seeds' recipe and conceptor.

    python benchmarks/ti_profile.py [--size bundled|tiny] [--batch-size 1] [--steps 30] [--mixed-precision no|bf16]

Phases are timed with perf_counter around each part of a hand-unrolled step (data + VAE encode, text
encoder forward, UNet forward, backward, optimizer + row restore), on the same model in one process, so it
shows what a faster recipe can and cannot remove: conceptor skips the per-step image decode and VAE
encode and the whole-matrix AdamW; the text-encoder and UNet passes are the same work in both.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["bundled", "tiny"], default="bundled")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    args = ap.parse_args()
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from speed import images as write_images

    from conceptor import api
    from conceptor.models.load import load_components
    from conceptor.models.tokens import add_tokens

    work = Path(tempfile.mkdtemp())
    if args.size == "bundled":
        folder, res, init_word = api.bundled_model_path(), 64, "object"
    else:
        from conceptor.models.tiny import build_tiny_pipeline_folder

        folder, res, init_word = build_tiny_pipeline_folder(work / "m", "sd1"), 32, "toy"
    paths = sorted(Path(write_images(work / "img", res)).glob("*.png"))
    b = args.batch_size
    bf16 = args.mixed_precision == "bf16"

    def pixels(files) -> torch.Tensor:  # decode + resize + scale to [-1, 1], as the seeds' data loader does
        return torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((res, res)),
                                                        dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                            for p in files])

    rows = {}
    for recipe in ("reference", "conceptor"):
        c = load_components(str(folder))
        c.frozen()
        tok, te, vae, unet = c.tokenizer, c.text_encoder, c.vae, c.unet
        init = te.get_input_embeddings().weight[tok.convert_tokens_to_ids(init_word + "</w>")].detach()
        acp = c.scheduler.alphas_cumprod
        if recipe == "reference":  # resize the matrix, train all of it, restore the old rows after each step
            tok.add_tokens(["<c>"])
            te.resize_token_embeddings(len(tok))
            emb = te.get_input_embeddings()
            with torch.no_grad():
                emb.weight[-1] = init
            emb.weight.requires_grad_(True)
            params, orig = [emb.weight], emb.weight.detach().clone()
        else:
            ext = add_tokens(tok, te, "<c>", init[None])
            params = [ext.new]
            if bf16:
                for m in (te, vae, unet):
                    m.to(torch.bfloat16)
        opt = torch.optim.AdamW(params, lr=1e-3)
        ids = tok(["a photo of a <c>"] * b, padding="max_length", max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        if recipe == "conceptor":  # the posterior is computed once, before training
            with torch.no_grad():
                dist = vae.encode(pixels(paths[:b]).to(vae.dtype)).latent_dist
                mean, std = dist.mean.float(), dist.std.float()
        phases: dict[str, list[float]] = {k: [] for k in ("data + VAE", "text encoder", "UNet forward",
                                                           "backward", "optimizer", "total")}
        for step in range(args.warmup + args.steps):
            t = [time.perf_counter()]
            if recipe == "reference":
                x = pixels([paths[(step * b + j) % len(paths)] for j in range(b)])
                lat = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
            else:
                lat = (mean + std * torch.randn_like(mean)) * vae.config.scaling_factor
            noise = torch.randn_like(lat)
            ts = torch.randint(0, 1000, (b,))
            a = acp[ts].view(-1, 1, 1, 1)
            noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
            t.append(time.perf_counter())
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16 and recipe == "conceptor"):
                hidden = te(ids)[0]
                t.append(time.perf_counter())
                pred = unet(noisy.to(unet.dtype), ts, hidden.to(unet.dtype)).sample
            loss = F.mse_loss(pred.float(), noise)
            t.append(time.perf_counter())
            loss.backward()
            t.append(time.perf_counter())
            opt.step()
            opt.zero_grad(set_to_none=True)
            if recipe == "reference":
                with torch.no_grad():
                    emb.weight[:-1] = orig[:-1]
            t.append(time.perf_counter())
            if step >= args.warmup:
                for k, (t0, t1) in zip(list(phases)[:-1], zip(t, t[1:])):
                    phases[k].append(t1 - t0)
                phases["total"].append(t[-1] - t[0])
        rows[recipe] = {k: 1000 * statistics.median(v) for k, v in phases.items()}
    print(f"{args.size} model, batch {b}, conceptor in {args.mixed_precision} mixed precision (reference fp32), "
          f"median ms over {args.steps} steps; torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads\n")
    print("| phase | reference (ms) | conceptor (ms) |\n|---|---|---|")
    for k in rows["reference"]:
        print(f"| {k} | {rows['reference'][k]:.1f} | {rows['conceptor'][k]:.1f} |")
    print(f"\nratio (reference / conceptor): {rows['reference']['total'] / rows['conceptor']['total']:.2f}x")


if __name__ == "__main__":
    main()

"""Fixed-seed runs of every method on tiny models built in code, hashed: proof that a refactor changed nothing.

    python benchmarks/behaviour_hashes.py --write before.json     # on the old code
    python benchmarks/behaviour_hashes.py --check before.json     # on the new code: same bytes, or the
                                                                  # largest difference of each tensor
Runs: textual inversion (SD1, 2 vectors), DreamBooth full + text encoder, DreamBooth LoRA with prior
preservation (UNet + text encoder), fine-tuning with buckets, SDXL textual inversion. Each writes its
trained files; their tensors are hashed (safetensors headers carry no run-dependent metadata today, but
hashing tensors keeps the proof about weights, not headers).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _images(folder: Path, n: int = 4, size: int = 64) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (40, 70, 200))
        ImageDraw.Draw(im).ellipse([10 + 2 * i, 12, 50, 52 - i], fill=(245, 205, 30))
        im.save(folder / f"{i}.png")
    return folder


def _dataset(root: Path) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["image_path,caption"]
    for i, size in enumerate([(48, 32), (32, 48), (40, 40), (64, 32), (32, 32), (48, 36)]):
        Image.new("RGB", size, (200, 40 * i, 60)).save(root / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,a drawing of a round creature number {i}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root / "data.csv"


def runs(tmp: Path) -> dict[str, tuple[str, dict]]:
    from conceptor.models.tiny import build_tiny_pipeline_folder

    sd1 = build_tiny_pipeline_folder(tmp / "sd1", "sd1")
    sdxl = build_tiny_pipeline_folder(tmp / "sdxl", "sdxl")
    images = _images(tmp / "images")
    common = {"train": {"steps": 4, "batch_size": 2, "log_every": 1, "checkpoint_every": 2, "seed": 3}}

    def cfg(model, section, values, **extra):
        return {"model": {"model": str(model)}, "data": {"images": str(images)}, "optim": {"lr": 1e-2},
                **common, section: values, **extra}

    ti = {"token": "<toy>", "init_token": "toy", "vectors": 2}
    return {
        "ti-sd1": ("textual-inversion", cfg(sd1, "textual_inversion", ti)),
        "db-full-te": ("dreambooth", cfg(sd1, "dreambooth", {"instance_prompt": "a photo of sks toy",
                                                             "train_text_encoder": True})),
        "db-lora-prior": ("dreambooth", cfg(sd1, "dreambooth", {
            "instance_prompt": "a photo of sks toy", "class_prompt": "a photo of a toy", "num_class_images": 3,
            "class_sampling_steps": 2, "lora": True, "rank": 2, "lora_text_encoder": True})),
        "ft-buckets": ("finetune", {"model": {"model": str(sd1)}, "optim": {"lr": 1e-3}, **common,
                                    "finetune": {"dataset": str(_dataset(tmp / "ds")), "buckets": True,
                                                 "cache_dir": "none", "caption_dropout": 0.2}}),
        "ti-sdxl": ("textual-inversion", cfg(sdxl, "textual_inversion", ti)),
    }


def tensor_hashes(folder: Path) -> dict[str, dict[str, str]]:
    """{file: {tensor: sha256}} of every safetensors output (class images and caches excluded)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        rel = str(f.relative_to(folder))
        if rel.startswith("class_images"):
            continue
        tensors = load_file(str(f))
        out[rel] = {k: hashlib.sha256(v.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
                    .hexdigest()[:16] for k, v in sorted(tensors.items())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="JSON")
    g.add_argument("--check", metavar="JSON")
    p.add_argument("--keep", metavar="DIR", help="keep the run folders here (for --check's differences)")
    args = p.parse_args(argv)

    import torch

    from conceptor import api
    from conceptor.config import build_config

    torch.set_num_threads(2)
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="conceptor-hashes-"))
    result = {}
    for name, (method, values) in runs(tmp).items():
        values["train"] = {**values["train"], "output": str(tmp / "runs" / name), "overwrite": True}
        api.train(build_config(method, None, values))
        result[name] = tensor_hashes(tmp / "runs" / name)
        print(f"{name}: {sum(len(v) for v in result[name].values())} tensors in {len(result[name])} files",
              file=sys.stderr)
    if args.write:
        Path(args.write).write_text(json.dumps(result, indent=1, sort_keys=True))
        return 0
    want = json.loads(Path(args.check).read_text())
    bad = 0
    for name in want:
        for f in sorted(set(want[name]) | set(result.get(name, {}))):
            a, b = want[name].get(f), result.get(name, {}).get(f)
            if a != b:
                bad += 1
                diff = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k))
                print(f"DIFF {name}/{f}: {len(diff)} tensor(s) differ, e.g. {diff[:3]}")
    print("same bytes" if not bad else f"{bad} file(s) differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

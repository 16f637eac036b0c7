"""Write the shipped toy-world model: a pretraining folder in fp16, with its recipe and scores beside it.

    python -m conceptor.toyworld.bundle RUN_FOLDER [--vae FOLDER] [--scores evaluate.json] [--guidance G]

fp16 halves the size (the package budget is ~20 MB); every loader in conceptor casts back to fp32 on the
CPU. Plain diffusers code does too: diffusers loads the UNet and VAE in fp32 unless told otherwise, and
transformers 5 loads a model in its config's ``dtype``, which the bundle sets to float32 (the weights in the
file stay fp16). Otherwise ``StableDiffusionPipeline.from_pretrained(bundled)`` would pair an fp16 text
encoder with an fp32 UNet and fail on the CPU.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from ..fileio import atomic_dir
from . import MODEL_FOLDER


def ship_model(src: str | Path, dst: str | Path = MODEL_FOLDER, vae: str | Path | None = None,
               scores: dict | None = None, guidance: float | None = None) -> Path:
    """Copy ``src`` to ``dst`` with fp16 weights; ``vae`` swaps in another VAE (e.g. a fine-tuned decoder).

    ``guidance`` becomes the model's default guidance scale (its conceptor.json), measured with
    ``benchmarks/model_quality.py --guidance G``: a tiny model wants less than SD's 7.5.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from conceptor.models.load import SAMPLING_FILE, quiet_libraries

    quiet_libraries()
    src, dst = Path(src), Path(dst)
    recipe = json.loads((src / "recipe.json").read_text())
    with atomic_dir(dst) as tmp:
        for part in ("tokenizer", "scheduler"):
            shutil.copytree(src / part, tmp / part)
        shutil.copy(src / "model_index.json", tmp / "model_index.json")
        UNet2DConditionModel.from_pretrained(src / "unet").to(torch.float16).save_pretrained(tmp / "unet")
        CLIPTextModel.from_pretrained(src / "text_encoder", dtype=torch.float32).to(torch.float16).save_pretrained(
            tmp / "text_encoder")
        te_config = tmp / "text_encoder" / "config.json"  # load as fp32 by default (see the module docstring)
        te_config.write_text(json.dumps({**json.loads(te_config.read_text()), "dtype": "float32"}, indent=2) + "\n")
        vae_src = Path(vae) if vae else src / "vae"
        AutoencoderKL.from_pretrained(vae_src).to(torch.float16).save_pretrained(tmp / "vae")
        if vae:
            vae_recipe = Path(vae).parent / "recipe.json"
            recipe["vae_swapped_in"] = {"from": str(vae), "recipe": json.loads(vae_recipe.read_text())
                                        if vae_recipe.is_file() else None}
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))
        if guidance is not None:
            (tmp / SAMPLING_FILE).write_text(json.dumps({"guidance": guidance}, indent=2) + "\n")
        elif (src / SAMPLING_FILE).is_file():
            shutil.copy(src / SAMPLING_FILE, tmp / SAMPLING_FILE)
        if scores:
            (tmp / "scores.json").write_text(json.dumps(scores, indent=2))
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("--dst", default=str(MODEL_FOLDER))
    ap.add_argument("--vae", default=None)
    ap.add_argument("--scores", default=None, help="an evaluate.py --json table to keep beside the model")
    ap.add_argument("--guidance", type=float, default=None, help="the model's default guidance scale")
    args = ap.parse_args(argv)
    scores = json.loads(Path(args.scores).read_text()) if args.scores else None
    print(ship_model(args.src, args.dst, args.vae, scores, args.guidance))


if __name__ == "__main__":
    main()

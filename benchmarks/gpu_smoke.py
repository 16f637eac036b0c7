"""Every method, a few steps, on a GPU in fp16 and bf16 mixed precision (tiny random model).

    python benchmarks/gpu_smoke.py

What only a GPU shows: fp16 autocast with the gradient scaler (trainables must stay fp32, or accelerate
stops with "Attempting to unscale FP16 gradients"), fused AdamW, and that every output is written.
Prints one row per run; exits non-zero if any failed.
"""
from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


def main() -> int:
    import torch
    from speed import images

    from conceptor import api
    from conceptor.config import build_config
    from conceptor.models.load import load_components
    from conceptor.models.tiny import build_tiny_pipeline_folder

    precisions = ("fp16", "bf16") if torch.cuda.is_available() else ("no",)  # the CPU: a dry run of this script
    work = Path(tempfile.mkdtemp())
    model = build_tiny_pipeline_folder(work / "m", "sd1")
    inst = images(work / "img", 32)
    data = images(work / "data", 32, n=8, captions=True)
    runs = {
        "ti": ("textual-inversion", {"token": "<c>", "init_token": "toy"}),
        "db-full+te": ("dreambooth", {"instance_prompt": "a photo of sks toy", "train_text_encoder": True}),
        "db-lora+te": ("dreambooth", {"instance_prompt": "a photo of sks toy", "lora": True,
                                      "lora_text_encoder": True}),
        "db-prior": ("dreambooth", {"instance_prompt": "a photo of sks toy", "class_prompt": "a photo of a toy",
                                    "num_class_images": 2, "class_sampling_steps": 2}),
        "finetune": ("finetune", {"dataset": data, "cache_dir": str(work / "cache")}),
        "finetune-lora": ("finetune", {"dataset": data, "cache_dir": str(work / "cache"), "lora": True}),
    }
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}, torch {torch.__version__}\n")
    print("| run | precision | loss | outputs |\n|---|---|---|---|")
    failed = 0
    for precision in precisions:
        for name, (method, section) in runs.items():
            out = work / f"{name}-{precision}"
            try:
                cfg = build_config(method, None, {
                    "data": {"images": inst, "resolution": 32},
                    "train": {"output": str(out), "steps": 4, "batch_size": 2, "checkpoint_every": 2,
                              "mixed_precision": precision, "log_every": 1},
                    method.replace("-", "_"): section})
                result = api.train(cfg, load_components(str(model)))
                ok = result.last_loss is not None and torch.isfinite(torch.tensor(result.last_loss))
                files = [f.name for f in result.files]
                print(f"| {name} | {precision} | {result.last_loss:.4f} | {', '.join(files)} |", flush=True)
                failed += not ok
            except Exception as e:  # report and go on: one table for every run
                failed += 1
                print(f"| {name} | {precision} | FAILED: {type(e).__name__}: {str(e)[:150]} | |", flush=True)
                traceback.print_exc(file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Every method splits the global batch across processes: on the CPU over gloo, 2 processes x batch 1 train
exactly what 1 process x batch 2 does (fine-tuning's own check is in test_finetune.py).

Adam with a large epsilon is a plain gradient step, so the results differ only by float summation order
(Adam's sign-like first steps would amplify that order into lr-sized differences on ~zero gradients).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

TOKEN = "<toy>"
CASES = {
    "textual-inversion": (["textual-inversion", "--token", TOKEN, "--init-token", "toy", "--vectors", "2"],
                          "learned_embeds.safetensors"),
    "dreambooth-full": (["dreambooth", "--instance-prompt", "a photo of sks toy", "--train-text-encoder"],
                        "unet/diffusion_pytorch_model.safetensors"),
    "dreambooth-lora-prior": (["dreambooth", "--instance-prompt", "a photo of sks toy", "--class-prompt",
                               "a photo of a toy", "--num-class-images", "3", "--class-sampling-steps", "2",
                               "--lora", "--rank", "2", "--lora-text-encoder"],
                              "pytorch_lora_weights.safetensors"),
    # Flux: the flow-matching loss draws noise and sigmas for the global batch the same way
    "flux-lora-prior": (["dreambooth", "--instance-prompt", "a photo of sks toy", "--class-prompt",
                         "a photo of a toy", "--num-class-images", "3", "--class-sampling-steps", "2",
                         "--lora", "--rank", "2"], "pytorch_lora_weights.safetensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_with_the_global_batch(case, tiny_sd1, concept_images, tmp_path, request):
    method_args, output_file = CASES[case]
    model = request.getfixturevalue("tiny_flux") if case.startswith("flux") else tiny_sd1
    (tmp_path / "sgd.yaml").write_text("optim:\n  adam_epsilon: 1.0\n")
    common = ["train", *method_args, "--model", str(model), "--images", str(concept_images), "--steps", "3",
              "--lr", "5e-2", "--checkpoint-every", "0", "--log-every", "1", "--seed", "5",
              "--config", str(tmp_path / "sgd.yaml")]
    if "--class-prompt" in method_args:  # one set of class images for both runs
        common += ["--class-images", str(tmp_path / "class")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, "-m", "conceptor", *common, "--batch-size", "2", "--output",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    port = str(29540 + list(CASES).index(case))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", port, "-m", "conceptor", *common, "--batch-size", "1", "--output",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]

    a, b = load_file(str(tmp_path / "one" / output_file)), load_file(str(tmp_path / "two" / output_file))
    assert a.keys() == b.keys()
    if case == "dreambooth-full":
        base = load_file(str(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors"))
        moved = max((a[k] - base[k]).abs().max().item() for k in a)
    elif case == "textual-inversion":  # both vectors started as the embedding of "toy"
        from transformers import CLIPTextModel, CLIPTokenizer

        from conceptor.models.tokens import initializer_ids

        tok = CLIPTokenizer.from_pretrained(str(tiny_sd1 / "tokenizer"))
        te = CLIPTextModel.from_pretrained(str(tiny_sd1 / "text_encoder"), dtype=torch.float32)
        init = te.get_input_embeddings().weight[initializer_ids(tok, "toy")[0]].detach()
        moved = (a[TOKEN] - init).abs().max().item()
    else:  # LoRA: the up matrices start at zero
        moved = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-4, "the run did not train"
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, f"2 processes x batch 1 differ from 1 x batch 2 by {worst:g}"
    # One writer: the main process logs each step once.
    assert sum('"loss"' in r for r in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 3
    assert torch.isfinite(torch.cat([v.flatten() for v in b.values()])).all()

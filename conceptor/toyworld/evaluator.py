"""The toy world's judge: a small CNN that names shape, colour, background and pattern of a 64x64 image
and gives a feature vector for similarity (the toy analogue of CLIP/DINO scores).

Trained on ground-truth renders with noise and blur, so it also reads generated images.

    python -m conceptor.toyworld.evaluator [--steps N]    # trains and writes conceptor/toyworld/evaluator/
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from ..fileio import atomic_dir
from . import EVALUATOR_FOLDER
from . import world as W

HEADS = {"shape": W.SHAPES, "color": tuple(W.COLORS), "background": tuple(W.BACKGROUND_COLORS),
         "pattern": W.PATTERNS}
FOLDER = EVALUATOR_FOLDER


class Net(nn.Module):
    def __init__(self, width: int = 16, features: int = 128):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for a, b in zip(chans, chans[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(chans[-1], features)
        self.heads = nn.ModuleDict({k: nn.Linear(features, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f = self.proj(self.body(x).mean((2, 3)))
        return f, {k: head(F.relu(f)) for k, head in self.heads.items()}


def to_batch(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((W.SIZE, W.SIZE), Image.BILINEAR), dtype=np.float32)
                    for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


@dataclass
class Prediction:
    shape: list[str]
    color: list[str]
    background: list[str]
    pattern: list[str]
    features: torch.Tensor  # [n, d], L2-normalised


class Evaluator:
    def __init__(self, net: Net):
        self.net = net.eval()

    @torch.no_grad()
    def predict(self, images: list[Image.Image], batch_size: int = 256) -> Prediction:
        feats, labels = [], {k: [] for k in HEADS}
        for i in range(0, len(images), batch_size):
            f, logits = self.net(to_batch(images[i:i + batch_size]))
            feats.append(F.normalize(f, dim=-1))
            for k, v in logits.items():
                labels[k] += [HEADS[k][j] for j in v.argmax(-1).tolist()]
        return Prediction(features=torch.cat(feats), **labels)


def load_evaluator(folder: str | Path = FOLDER) -> Evaluator:
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    net = Net(config["width"], config["features"])
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return Evaluator(net)


def _augment(im: Image.Image, rng: random.Random) -> Image.Image:
    """Blur and noise like a small diffusion model's output, so generated images are read correctly."""
    if rng.random() < 0.5:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2)))
    arr = np.asarray(im, dtype=np.float32)
    arr = arr + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(0, 12), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _labels(specs) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([HEADS[k].index(getattr(s, k)) for s in specs]) for k in HEADS}


def train(steps: int = 1500, batch: int = 64, seed: int = 0, out: Path = FOLDER, log=print) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for step in range(steps):
        specs = [W.random_spec(rng, shapes=W.SHAPES, exclude=frozenset()) for _ in range(batch)]
        x = to_batch([_augment(W.render(s), rng) for s in specs])
        _, logits = net(x)
        y = _labels(specs)
        loss = sum(F.cross_entropy(logits[k], y[k]) for k in HEADS)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            log(f"evaluator step {step} loss {loss.item():.4f}")
    accuracy = held_out_accuracy(Evaluator(net), seed=seed + 12345)
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({"width": 16, "features": 128, "heads": HEADS,
                                                     "train_steps": steps, "batch": batch, "seed": seed,
                                                     "held_out_accuracy": accuracy}, indent=2))
    return accuracy


def held_out_accuracy(evaluator: Evaluator, seed: int, n: int = 1000) -> dict[str, float]:
    """Accuracy on fresh renders (new seed), augmented like the training data."""
    rng = random.Random(seed)
    specs = [W.random_spec(rng, shapes=W.SHAPES, exclude=frozenset()) for _ in range(n)]
    pred = evaluator.predict([_augment(W.render(s), rng) for s in specs])
    return {k: float(np.mean([p == getattr(s, k) for p, s in zip(getattr(pred, k), specs)])) for k in HEADS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(train(args.steps), indent=2))


if __name__ == "__main__":
    main()

"""Tiny CLIP and DINO-shaped models built in code, saved as transformers folders, so the concept metrics
(eval/metrics.py) are tested through the same ``from_pretrained`` path that reads openai/clip-vit-large-patch14
and facebook/dino-vits16. Random weights: the numbers mean nothing, only their algebra is tested."""
from __future__ import annotations

from pathlib import Path

import torch

from .tiny_tokenizers import DEFAULT_WORDS, write_clip_tokenizer

SIZE, PATCH, HIDDEN = 32, 8, 32  # 16 patches of 8 px: a forward pass is microseconds on a CPU


def _vision_kw() -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                image_size=SIZE, patch_size=PATCH)


def build_tiny_clip_folder(folder: str | Path, seed: int = 0) -> Path:
    """A CLIPModel (text + vision towers, 16-d projection) with a CLIPTokenizer and CLIPImageProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    vocab_size = write_clip_tokenizer(folder, DEFAULT_WORDS)
    # The text tower pools at the eos token; ids must match the tokenizer written above (its last two tokens).
    text = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    with torch.random.fork_rng(devices=[]):  # seeded weights without moving the caller's random stream
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=_vision_kw(), projection_dim=16)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(folder)
                  ).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def build_tiny_dino_folder(folder: str | Path, seed: int = 0) -> Path:
    """A ViTModel (what AutoModel makes of facebook/dino-vits16) with a ViTImageProcessor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(ViTConfig(**_vision_kw())).eval()
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder

"""Textual inversion (Gal et al. 2022): learn new token vectors; text encoder, UNet and VAE stay frozen.

Faster than the seeds' recipe in two ways, both exact: VAE latents are computed once per image (and
flip) and only their Gaussian is sampled each step; the optimizer holds only the new vectors, not the
whole embedding matrix (see models/tokens.py). The text encoder still runs every step, as it must.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MethodSpec, RunConfig, opt
from ..data.images import list_images, load_image, read_caption, to_tensor
from ..data.order import batch_indices
from ..data.templates import fill, load_templates
from ..errors import ConceptorError
from ..formats.embeddings import Embedding, write_embedding
from ..models.load import Components
from ..models.text import added_conditioning, check_token_fits, encode, token_ids
from ..models.tokens import add_tokens, check_new_token, expand_prompt, initializer_id, token_names
from ..sampling.pipeline import check_vae_memory
from ..training.method import Setup, Shard
from .denoise import LatentSet, denoising_loss

log = logging.getLogger("conceptor")


@dataclass
class TextualInversionConfig:
    token: str = opt("", "the new placeholder token, e.g. '<cat-toy>'")
    init_token: str = opt("", "one existing word to start from, e.g. toy")
    vectors: int = opt(1, "vectors per token (default 1)", metavar="N")
    what: str = opt("object", "template set (default object)", choices=("object", "style"))
    templates: str | None = opt(None, "own templates, one per line with {} for the token", metavar="FILE")


def _checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    ti = cfg.options
    return [
        (cfg.data.images is not None, "--images is required: a folder with 3-20 pictures of your concept"),
        (bool(ti.token), "--token is required, e.g. --token '<cat-toy>'"),
        (bool(ti.init_token), "--init-token is required: one word close to the concept, e.g. toy"),
        (1 <= ti.vectors <= 64, "--vectors must be between 1 and 64"),
        (ti.what in ("object", "style"), "--what must be object or style"),
    ]


class TextualInversion:
    name = "textual-inversion"

    def setup(self, components: Components, cfg: RunConfig, device: torch.device,
              shard: Shard = Shard()) -> Setup:
        ti = cfg.textual_inversion
        self.c, self.cfg, self.device, self.shard = components, cfg, device, shard
        self.token, self.num_vectors = ti.token, ti.vectors
        clips = components.clip_encoders  # SDXL/SD3: the token goes into both CLIP vocabularies (T5 stays as is)
        for tok, _ in clips:
            for name in token_names(ti.token, ti.vectors):
                check_new_token(tok, name)
        init_ids = [initializer_id(tok, ti.init_token) for tok, _ in clips]
        templates = load_templates(ti.what, ti.templates)

        resolution = cfg.data.resolution or components.default_resolution
        paths = list_images(cfg.data.images)
        images = [load_image(p) for p in paths]
        # A sidecar caption replaces the templates for its image ("{}" or the token marks the concept).
        self.captions: list[list[str]] = []
        for p in paths:
            caption = read_caption(p)
            if caption is not None and "{}" not in caption and ti.token not in caption:
                raise ConceptorError(f"caption {p.with_suffix('.txt')} must contain {ti.token} or {{}} where the "
                                     "concept goes")
            self.captions.append([caption] if caption else templates)
        # A token cut off at the encoder's limit gets no gradient: torch would stop at the first step with
        # "element 0 of tensors does not require grad". Say which text, before minutes of set-up.
        texts = {c[0]: f"caption {p.with_suffix('.txt')}" for p, c in zip(paths, self.captions) if c is not templates}
        if any(c is templates for c in self.captions):
            texts.update({t: f"template {t[:40]!r}" + (f" of {ti.templates}" if ti.templates else "")
                          for t in templates})
        for text, source in texts.items():
            check_token_fits(components, fill(text, ti.token), ti.token, ti.vectors, source)
        # Before any image is resized: at --resolution 200000 PIL alone would ask for 160 GB.
        check_vae_memory(components.vae, 1, resolution, resolution, f"--resolution {resolution}", "VAE encoder")

        pixels = torch.stack([to_tensor(im, resolution, cfg.data.center_crop) for im in images])
        self.latents = LatentSet(components, pixels, flip=cfg.data.flip_p > 0)
        n = self.num_items = len(paths)
        self.resolution = resolution

        # One trained row block per CLIP encoder; SDXL and SD3 train both (the 768- and the 1280-wide one).
        self.embeddings = []
        for (tok, te), init_id in zip(clips, init_ids):
            init = te.get_input_embeddings().weight[init_id].detach().float()
            self.embeddings.append(add_tokens(tok, te, ti.token, init.repeat(ti.vectors, 1)))
        self.first_trained_row = self.embeddings[0].new.shape[0] - ti.vectors
        self._ids_cache: dict[str, list[torch.Tensor]] = {}
        log.info("textual inversion: %d image(s) at %dpx, token %s x%d vector(s) initialised from %r%s",
                 n, resolution, ti.token, ti.vectors, ti.init_token,
                 " in both CLIP text encoders" if len(clips) > 1 else "")
        return Setup([{"params": [e.new for e in self.embeddings]}])

    # -- per step --------------------------------------------------------------------------------
    def _ids(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids per tokenizer, cached per prompt (templates repeat)."""
        for p in prompts:
            if p not in self._ids_cache:
                self._ids_cache[p] = [ids[0] for ids in token_ids(self.c, [self.prompt(p)])]
        return [torch.stack([self._ids_cache[p][k] for p in prompts]).to(self.device)
                for k in range(len(self.c.tokenizers))]

    def loss(self, micro_index: int, generator: torch.Generator) -> torch.Tensor:
        cfg, shard = self.cfg, self.shard
        n = cfg.train.batch_size * shard.world  # the global batch; this process encodes and denoises its rows
        idx = batch_indices(micro_index, n, self.num_items, cfg.data.repeats, cfg.train.seed)
        choice = torch.randint(0, 1 << 30, (n,), generator=generator).tolist()
        mine = shard.rows(n)
        prompts = [fill(self.captions[idx[j]][choice[j] % len(self.captions[idx[j]])], self.token) for j in mine]
        latents = self.latents.sample(idx, cfg.data.flip_p, generator, rows=mine).to(self.device)
        hidden, pooled = encode(self.c, self._ids(prompts))
        added = added_conditioning(self.c, pooled, self.resolution)
        per_sample = denoising_loss(self.c, latents, hidden, cfg.train, generator, rows=(mine, n), added_cond=added)
        return shard.mean(per_sample, n)

    # -- state and files -------------------------------------------------------------------------
    def vectors(self, k: int = 0) -> torch.Tensor:
        return self.embeddings[k].new[self.first_trained_row:].detach().float().cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        keys = ("vectors", "vectors_2")
        return {keys[k]: self.vectors(k).contiguous() for k in range(len(self.embeddings))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, key in enumerate(("vectors", "vectors_2")[:len(self.embeddings)]):
            v = state.get(key)
            if v is None or v.shape != self.vectors(k).shape:
                raise ConceptorError(f"checkpoint holds {None if v is None else tuple(v.shape)} {key} but this run "
                                     f"trains {tuple(self.vectors(k).shape)}; resume with the same --vectors and model")
            with torch.no_grad():
                self.embeddings[k].new[self.first_trained_row:] = v.to(self.embeddings[k].new.device)

    def save(self, folder: Path, step: int, final: bool) -> list[Path]:
        sdxl = len(self.embeddings) > 1
        emb = Embedding(token=self.token, vectors=self.vectors(), vectors_2=self.vectors(1) if sdxl else None)
        name = "learned_embeds.safetensors" if final else f"learned_embeds-steps-{step}.safetensors"
        path = Path(folder) / name
        # SDXL: one {"clip_l", "clip_g"} file, what A1111, ComfyUI and kohya load.
        write_embedding(emb, path, "kohya" if sdxl else "diffusers")
        return [path]

    def prompt(self, text: str) -> str:
        return expand_prompt(text, {self.token: self.num_vectors})


SPEC = MethodSpec(name="textual-inversion", section="textual_inversion", options=TextualInversionConfig,
                  make=TextualInversion, help="learn new token embeddings (model frozen)", lr=5e-4, flip_p=0.5,
                  checks=_checks)

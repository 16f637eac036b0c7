"""Textual inversion (Gal et al. 2022): learn new token vectors; text encoder, UNet and VAE stay frozen.

Faster than the seeds' recipe in two ways, both exact: VAE latents are computed once per image (and
flip) and only their Gaussian is sampled each step; the optimizer holds only the new vectors, not the
whole embedding matrix (see models/tokens.py). The text encoder still runs every step, as it must.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MethodSpec, RunConfig, opt
from ..data.dataset import caption_rng, realise
from ..data.order import EntryOrder
from ..data.templates import fill, load_templates
from ..errors import ConceptorError
from ..formats.embeddings import Embedding, write_embedding
from ..models.load import Components
from ..models.text import added_conditioning, check_token_fits, encode, token_ids
from ..models.tokens import add_tokens, check_new_token, expand_prompt, initializer_id, token_names
from ..sampling.pipeline import check_vae_memory
from ..training.method import Setup, Shard
from .denoise import LatentSet, denoising_loss
from .trainset import any_flips, datasets_of, flip_probabilities, training_set

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
    file = cfg.data.dataset_file()  # subsets may name their own token and init_token there
    return [
        (cfg.data.images or cfg.data.dataset, "--images is required: a folder with 3-20 pictures of your concept "
                                              "(or --dataset: a kohya dataset config or a captioned source)"),
        (bool(ti.token) or file, "--token is required, e.g. --token '<cat-toy>'"),
        (bool(ti.init_token) or file, "--init-token is required: one word close to the concept, e.g. toy"),
        (1 <= ti.vectors <= 64, "--vectors must be between 1 and 64"),
        (ti.what in ("object", "style"), "--what must be object or style"),
    ]


class TextualInversion:
    name = "textual-inversion"

    def setup(self, components: Components, cfg: RunConfig, device: torch.device,
              shard: Shard = Shard()) -> Setup:
        ti = cfg.textual_inversion
        self.c, self.cfg, self.device, self.shard = components, cfg, device, shard
        self.num_vectors = ti.vectors
        datasets, source = datasets_of(cfg, captions="auto", token=ti.token or None)
        ts = self.data = training_set(cfg, components, datasets, source)
        # Each subset trains its own token (a dataset config may name several: several concepts in one run).
        self.tokens: list[str] = []
        inits: dict[str, str] = {}
        for sub in ts.subsets:
            if sub.is_reg:
                raise ConceptorError(f"{source}: {sub.name} is a regularisation subset; textual inversion trains only "
                                     "its tokens' vectors, which class captions never contain, so it would do nothing")
            token, init = sub.token or ti.token, sub.init_token or ti.init_token
            if not token or not init:
                raise ConceptorError(f"{source}: {sub.name} needs token and init_token (or --token/--init-token)")
            if token not in inits:
                self.tokens.append(token)
            elif inits[token] != init:
                raise ConceptorError(f"{source}: {sub.name} starts {token} from {init!r} but another subset from "
                                     f"{inits[token]!r}; give one init_token per token")
            inits[token] = init
        self.token = self.tokens[0]
        clips = components.clip_encoders  # SDXL/SD3: the token goes into both CLIP vocabularies (T5 stays as is)
        for tok, _ in clips:
            for token in self.tokens:
                for name in token_names(token, ti.vectors):
                    check_new_token(tok, name)
        init_ids = [[initializer_id(tok, inits[t]) for t in self.tokens] for tok, _ in clips]
        templates = load_templates(ti.what, ti.templates)

        # Per item: its caption (a sidecar "{}" or the token marks the concept), its subset's class_tokens, or the
        # templates; and the token its "{}" stands for.
        self.captions: list[list[str]] = []
        self.item_token: list[str] = []
        texts: dict[str, tuple[str, str]] = {}
        for i, it in enumerate(ts.items):
            sub = ts.subset_of(i)
            token = sub.token or ti.token
            own = it.caption or sub.class_tokens
            if own is not None and "{}" not in own and token not in own:
                what = f"caption {it.caption_from}" if it.caption else f"class_tokens of {sub.name}"
                raise ConceptorError(f"{what} must contain {token} or {{}} where the concept goes")
            self.captions.append([own] if own else templates)
            self.item_token.append(token)
            if own:
                texts[fill(own, token)] = (token, f"caption {it.caption_from}" if it.caption else
                                           f"class_tokens of {sub.name}")
            else:
                texts.update({fill(t, token): (token, f"template {t[:40]!r}" + (f" of {ti.templates}"
                                                                                  if ti.templates else ""))
                              for t in templates})
        # A token cut off at the encoder's limit gets no gradient: torch would stop at the first step with
        # "element 0 of tensors does not require grad". Say which text, before minutes of set-up.
        for text, (token, where) in texts.items():
            check_token_fits(components, text, token, ti.vectors, where)
        # Before any image is resized: at --resolution 200000 PIL alone would ask for 160 GB.
        w, h = max((it.size for it in ts.items), key=lambda s: s[0] * s[1])
        check_vae_memory(components.vae, 1, h, w, f"--resolution {max(w, h)}", "VAE encoder")
        self.latents = LatentSet(components, ts, list(range(len(ts.items))), any_flips(ts, cfg.data.flip_p))
        self.order = EntryOrder(ts.entries(False), [it.size for it in ts.items], cfg.train.batch_size * shard.world,
                                cfg.train.seed)

        # One trained row block per CLIP encoder (SDXL and SD3 train both, the 768- and the 1280-wide one); each
        # block holds every token's vectors, in self.tokens order.
        self.embeddings = []
        for (tok, te), ids in zip(clips, init_ids):
            for token, init_id in zip(self.tokens, ids):
                init = te.get_input_embeddings().weight[init_id].detach().float()
                emb = add_tokens(tok, te, token, init.repeat(ti.vectors, 1))
            self.embeddings.append(emb)
        self.first_trained_row = self.embeddings[0].new.shape[0] - ti.vectors * len(self.tokens)
        self._ids_cache: dict[str, list[torch.Tensor]] = {}
        log.info("textual inversion: %d image(s), token(s) %s x%d vector(s) initialised from %s%s",
                 len(ts.items), ", ".join(self.tokens), ti.vectors, ", ".join(repr(inits[t]) for t in self.tokens),
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
        cfg, shard, ts = self.cfg, self.shard, self.data
        idx = self.order(micro_index)  # the global batch; this process encodes and denoises its rows
        n = len(idx)
        choice = torch.randint(0, 1 << 30, (n,), generator=generator).tolist()
        mine = shard.rows(n)
        if not mine:  # a short last batch of a bucket can leave a process empty; it still joins the average
            return sum(e.new.sum() * 0.0 for e in self.embeddings)
        prompts = [realise(fill(self.captions[idx[j]][choice[j] % len(self.captions[idx[j]])], self.item_token[idx[j]]),
                           ts.subset_of(idx[j]), caption_rng(cfg.train.seed, micro_index, j)) for j in mine]
        latents, weight = self.latents.sample(idx, flip_probabilities(ts, idx, cfg.data.flip_p), generator, rows=mine,
                                              mask_weight=cfg.data.mask_weight)
        hidden, pooled = encode(self.c, self._ids(prompts))
        w, h = ts.items[idx[0]].size
        added = added_conditioning(self.c, pooled, (h, w))
        per_sample = denoising_loss(self.c, latents.to(self.device), hidden, cfg.train, generator, rows=(mine, n),
                                    added_cond=added, weight=weight)
        return shard.mean(per_sample, n)

    # -- state and files -------------------------------------------------------------------------
    def vectors(self, k: int = 0) -> torch.Tensor:
        """Every token's trained rows in encoder ``k`` (its tokens in self.tokens order, ``vectors`` rows each)."""
        return self.embeddings[k].new[self.first_trained_row:].detach().float().cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        keys = ("vectors", "vectors_2")
        return {keys[k]: self.vectors(k).contiguous() for k in range(len(self.embeddings))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, key in enumerate(("vectors", "vectors_2")[:len(self.embeddings)]):
            v = state.get(key)
            if v is None or v.shape != self.vectors(k).shape:
                raise ConceptorError(f"checkpoint holds {None if v is None else tuple(v.shape)} {key} but this run "
                                     f"trains {tuple(self.vectors(k).shape)}; resume with the same --vectors, tokens "
                                     "and model")
            with torch.no_grad():
                self.embeddings[k].new[self.first_trained_row:] = v.to(self.embeddings[k].new.device)

    def save(self, folder: Path, step: int, final: bool) -> list[Path]:
        """One embedding file per token (what A1111, ComfyUI and diffusers load: one token each); one token keeps
        the seeds' name learned_embeds.safetensors, several are learned_embeds-<token>.safetensors."""
        sdxl, v = len(self.embeddings) > 1, self.num_vectors
        out = []
        for t, token in enumerate(self.tokens):
            rows = slice(t * v, (t + 1) * v)
            emb = Embedding(token=token, vectors=self.vectors()[rows],
                            vectors_2=self.vectors(1)[rows] if sdxl else None)
            stem = "learned_embeds" if len(self.tokens) == 1 else f"learned_embeds-{slug(token)}"
            path = Path(folder) / (f"{stem}.safetensors" if final else f"{stem}-steps-{step}.safetensors")
            # SDXL: one {"clip_l", "clip_g"} file, what A1111, ComfyUI and kohya load.
            write_embedding(emb, path, "kohya" if sdxl else "diffusers")
            out.append(path)
        return out

    def prompt(self, text: str) -> str:
        return expand_prompt(text, {token: self.num_vectors for token in self.tokens})


def slug(token: str) -> str:
    """A token as a file-name part: <cat-toy> -> cat-toy."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "", token).strip(".-") or "token"


SPEC = MethodSpec(name="textual-inversion", section="textual_inversion", options=TextualInversionConfig,
                  make=TextualInversion, help="learn new token embeddings (model frozen)", lr=5e-4, flip_p=0.5,
                  checks=_checks)

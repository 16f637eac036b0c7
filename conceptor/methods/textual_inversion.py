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
from ..models.tokens import add_tokens, check_new_token, expand_prompt, initial_vector, initializer_ids, token_names
from ..sampling.pipeline import check_vae_memory
from ..training.method import Setup, Shard
from .denoise import LatentSet, denoising_loss, validation_loss
from .provenance import Provenance
from .trainset import any_flips, datasets_of, flip_probabilities, training_set

log = logging.getLogger("conceptor")


@dataclass
class TextualInversionConfig:
    token: str = opt("", "the new placeholder token, e.g. '<cat-toy>'")
    init_token: str = opt("", "existing word(s) to start from, e.g. toy; several words (or a word the tokenizer "
                              "splits into pieces) start from their mean, e.g. 'red toy'")
    vectors: int = opt(1, "vectors per token (default 1)", metavar="N")
    what: str = opt("object", "template set (default object)", choices=("object", "style"))
    templates: str | None = opt(None, "own templates, one per line with {} for the token", metavar="FILE")
    init_embedding: str | None = opt(None, "continue training this embedding file (diffusers, A1111, kohya, SDXL "
                                           "clip_l/clip_g) instead of starting from --init-token", metavar="FILE",
                                     input=True)


def _checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    ti = cfg.options
    file = cfg.data.dataset_file()  # subsets may name their own token and init_token there
    return [
        (cfg.data.images or cfg.data.dataset, "--images is required: a folder with 3-20 pictures of your concept "
                                              "(or --dataset: a kohya dataset config or a captioned source)"),
        (bool(ti.token) or file, "--token is required, e.g. --token '<cat-toy>'"),
        (bool(ti.init_token) or file or ti.init_embedding,
         "--init-token is required: a word (or words) close to the concept, e.g. toy (or --init-embedding FILE)"),
        (1 <= ti.vectors <= 64, "--vectors must be between 1 and 64"),
        (ti.what in ("object", "style"), "--what must be object or style"),
    ]


RANDOM = "(random)"  # a token without an init word (pivotal tuning allows it): random rows


class TokenVectors:
    """New tokens and their trained vectors, in every CLIP encoder: what textual inversion trains and what pivotal
    tuning trains beside its LoRA. Each concept subset names its token (``token``, or the run's ``--token``) and the
    word it starts from; an item is captioned by its own caption or class_tokens ("{}" or the token marks the
    concept), else by the templates."""

    random_init_ok = False  # a token needs an init word (or --init-embedding) unless the method says otherwise

    def add_concept_tokens(self, components: Components, ts, source: str, opts) -> None:
        self.num_vectors = opts.vectors
        self.tokens: list[str] = []
        inits: dict[str, str] = {}
        for sub in ts.subsets:
            if sub.is_reg:
                continue
            token, init = sub.token or opts.token, sub.init_token or opts.init_token
            if opts.init_embedding and not init:
                init = f"file {opts.init_embedding}"
            if not init and self.random_init_ok:
                init = RANDOM
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
                for name in token_names(token, opts.vectors):
                    check_new_token(tok, name)
        start = self._init_vectors(opts, clips)  # --init-embedding: the file's vectors, else the init words'
        # Each CLIP encoder has its own tokenizer, so the same init text may split differently in each.
        init_ids = [[initializer_ids(tok, inits[t]) if start is None and inits[t] != RANDOM else None
                     for t in self.tokens] for tok, _ in clips]
        templates = load_templates(opts.what, opts.templates)

        # Per concept item: its caption choices and the token its "{}" stands for (regularisation items: none).
        self.captions: list[list[str] | None] = []
        self.item_token: list[str | None] = []
        texts: dict[str, tuple[str, str]] = {}
        for i, it in enumerate(ts.items):
            sub = ts.subset_of(i)
            if sub.is_reg:
                self.captions.append(None)
                self.item_token.append(None)
                continue
            token = sub.token or opts.token
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
                texts.update({fill(t, token): (token, f"template {t[:40]!r}" + (f" of {opts.templates}"
                                                                                  if opts.templates else ""))
                              for t in templates})
        # A token cut off at the encoder's limit gets no gradient: torch would stop at the first step with
        # "element 0 of tensors does not require grad". Say which text, before minutes of set-up.
        for text, (token, where) in texts.items():
            check_token_fits(components, text, token, opts.vectors, where)

        # One trained row block per CLIP encoder (SDXL and SD3 train both, the 768- and the 1280-wide one); each
        # block holds every token's vectors, in self.tokens order.
        self.embeddings = []
        for k, ((tok, te), ids) in enumerate(zip(clips, init_ids)):
            for token, word_ids in zip(self.tokens, ids):
                if start is not None:
                    init = start[k].to(te.get_input_embeddings().weight.device)
                elif word_ids is None:  # no init word: random rows at the vocabulary's scale, as diffusers' script
                    weight = te.get_input_embeddings().weight.detach().float()
                    g = torch.Generator().manual_seed(self.cfg.train.seed + 7919 * (k + 1))
                    init = (torch.randn(opts.vectors, weight.shape[1], generator=g) * weight.std()).to(weight.device)
                else:  # every vector starts at the init text's row (several tokens: their mean)
                    init = initial_vector(te.get_input_embeddings().weight, word_ids).repeat(opts.vectors, 1)
                emb = add_tokens(tok, te, token, init)
            self.embeddings.append(emb)
        self.first_trained_row = self.embeddings[0].new.shape[0] - opts.vectors * len(self.tokens)
        log.info("new token(s) %s x%d vector(s) initialised from %s%s", ", ".join(self.tokens), opts.vectors,
                 ", ".join(repr(inits[t]) for t in self.tokens),
                 " in both CLIP text encoders" if len(clips) > 1 else "")

    def _init_vectors(self, opts, clips) -> list[torch.Tensor] | None:
        """--init-embedding: the file's vectors per CLIP encoder (widths and count checked), or None."""
        if not getattr(opts, "init_embedding", None):
            return None
        from ..models.init_from import init_embedding_from

        if len(self.tokens) > 1:
            raise ConceptorError(f"--init-embedding gives one token's vectors but this run trains {len(self.tokens)} "
                                 f"({', '.join(self.tokens)}); train them apart or drop --init-embedding")
        _, vectors = init_embedding_from(opts.init_embedding, None, clips)
        if vectors[0].shape[0] != opts.vectors:
            raise ConceptorError(f"{Path(opts.init_embedding).name} holds {vectors[0].shape[0]} vector(s) but "
                                 f"--vectors is {opts.vectors}: pass --vectors {vectors[0].shape[0]}")
        return vectors

    def concept_caption(self, i: int, pick: int) -> str:
        """Item i's caption choice ``pick`` (mod the choices) with its token in place of "{}"."""
        choices = self.captions[i]
        return fill(choices[pick % len(choices)], self.item_token[i])

    def vectors(self, k: int = 0) -> torch.Tensor:
        """Every token's trained rows in encoder ``k`` (its tokens in self.tokens order, ``vectors`` rows each)."""
        return self.embeddings[k].new[self.first_trained_row:].detach().float().cpu()

    def vectors_state(self) -> dict[str, torch.Tensor]:
        keys = ("vectors", "vectors_2")
        return {keys[k]: self.vectors(k).contiguous() for k in range(len(self.embeddings))}

    def load_vectors_state(self, state: dict[str, torch.Tensor]) -> None:
        for k, key in enumerate(("vectors", "vectors_2")[:len(self.embeddings)]):
            v = state.get(key)
            if v is None or v.shape != self.vectors(k).shape:
                raise ConceptorError(f"checkpoint holds {None if v is None else tuple(v.shape)} {key} but this run "
                                     f"trains {tuple(self.vectors(k).shape)}; resume with the same --vectors, tokens "
                                     "and model")
            with torch.no_grad():
                self.embeddings[k].new[self.first_trained_row:] = v.to(self.embeddings[k].new.device)

    def token_embeddings(self) -> list[Embedding]:
        v, sdxl = self.num_vectors, len(self.embeddings) > 1
        return [Embedding(token=token, vectors=self.vectors()[t * v:(t + 1) * v],
                          vectors_2=self.vectors(1)[t * v:(t + 1) * v] if sdxl else None)
                for t, token in enumerate(self.tokens)]

    def save_embeddings(self, folder: Path, step: int, final: bool) -> list[Path]:
        """One embedding file per token (what A1111, ComfyUI and diffusers load: one token each); one token keeps
        the seeds' name learned_embeds.safetensors, several are learned_embeds-<token>.safetensors."""
        out = []
        for emb in self.token_embeddings():
            stem = "learned_embeds" if len(self.tokens) == 1 else f"learned_embeds-{slug(emb.token)}"
            path = Path(folder) / (f"{stem}.safetensors" if final else f"{stem}-steps-{step}.safetensors")
            # SDXL: one {"clip_l", "clip_g"} file, what A1111, ComfyUI and kohya load.
            write_embedding(emb, path, "kohya" if emb.vectors_2 is not None else "diffusers",
                            metadata=self.provenance.metadata("textual-inversion", step, final, trigger=emb.token))
            out.append(path)
        return out

    def prompt(self, text: str) -> str:
        return expand_prompt(text, {token: self.num_vectors for token in self.tokens})


class TextualInversion(TokenVectors):
    name = "textual-inversion"

    def setup(self, components: Components, cfg: RunConfig, device: torch.device,
              shard: Shard = Shard()) -> Setup:
        ti = cfg.textual_inversion
        self.c, self.cfg, self.device, self.shard = components, cfg, device, shard
        datasets, source = datasets_of(cfg, captions="auto", token=ti.token or None)
        ts = self.data = training_set(cfg, components, datasets, source)
        for sub in ts.subsets:
            if sub.is_reg:
                raise ConceptorError(f"{source}: {sub.name} is a regularisation subset; textual inversion trains only "
                                     "its tokens' vectors, which class captions never contain, so it would do nothing")
        self.provenance = Provenance(cfg, components, ts)
        self.add_concept_tokens(components, ts, source, ti)
        # Before any image is resized: at --resolution 200000 PIL alone would ask for 160 GB.
        w, h = max((it.size for it in ts.items), key=lambda s: s[0] * s[1])
        check_vae_memory(components.vae, 1, h, w, f"--resolution {max(w, h)}", "VAE encoder")
        self.latents = LatentSet(components, ts, list(range(len(ts.items))), any_flips(ts, cfg.data.flip_p))
        self.order = EntryOrder(ts.entries(False), [it.size for it in ts.items], cfg.train.batch_size * shard.world,
                                cfg.train.seed)
        self._ids_cache: dict[str, list[torch.Tensor]] = {}
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
        prompts = [realise(self.concept_caption(idx[j], choice[j]), ts.subset_of(idx[j]),
                           caption_rng(cfg.train.seed, micro_index, j)) for j in mine]
        latents, weight = self.latents.sample(idx, flip_probabilities(ts, idx, cfg.data.flip_p), generator, rows=mine,
                                              mask_weight=cfg.data.mask_weight)
        hidden, pooled = encode(self.c, self._ids(prompts))
        w, h = ts.items[idx[0]].size
        added = added_conditioning(self.c, pooled, (h, w))
        per_sample = denoising_loss(self.c, latents.to(self.device), hidden, cfg.train, generator, rows=(mine, n),
                                    added_cond=added, weight=weight)
        return shard.mean(per_sample, n)

    # -- state and files -------------------------------------------------------------------------
    def validation_loss(self) -> float | None:
        """Fixed-noise loss on the training images, each with its first caption (methods/denoise.py)."""
        idx = self.data.validation_items()
        captions = [self.prompt(self.concept_caption(i, 0)) for i in idx]
        return validation_loss(self.c, self.latents, idx, captions, self.cfg.train, lambda i: self.data.items[i].size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.vectors_state()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_vectors_state(state)

    def save(self, folder: Path, step: int, final: bool) -> list[Path]:
        return self.save_embeddings(folder, step, final)


def slug(token: str) -> str:
    """A token as a file-name part: <cat-toy> -> cat-toy."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "", token).strip(".-") or "token"


# The recipe (issue 25; docs/benchmarks.md "Learning curves"). lr 5e-3 at 4 images per step is the rate of Gal et
# al. 2022 (their base 5e-3) and what diffusers' README reaches with 5e-4 x --scale-lr over 4 images; the cosine
# decay lets the vector settle instead of wandering at that rate; and steps are drawn from DDPM timesteps
# 400-999 only, where the prompt decides shape and colour (ProSpect, Zhang et al. 2023: early denoising steps
# carry layout and colour, late ones texture; min-SNR and P2 weighting, Hang et al. 2023 and Choi et al. 2022,
# down-weight the same low-noise steps for the same reason). On the toy world the window is what lets a token
# tell blue from cyan. A style (--what style) keeps every step: its brush strokes and textures are what the
# low-noise steps draw. The seeds' recipe is --lr 5e-4 --batch-size 1 --lr-scheduler constant --min-timestep 0.
SPEC = MethodSpec(name="textual-inversion", section="textual_inversion", options=TextualInversionConfig,
                  make=TextualInversion, help="learn new token embeddings (model frozen)", lr=5e-3, flip_p=0.5,
                  batch_size=4, lr_scheduler="cosine", checks=_checks,
                  min_timestep=lambda cfg: 0 if cfg.options.what == "style" else 400)

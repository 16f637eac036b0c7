"""Pivotal tuning: new token vectors (textual inversion, in every CLIP encoder) and a LoRA, trained together.

Textual inversion finds a word but cannot teach the model a look it cannot draw; DreamBooth-LoRA teaches the look
but spends a rare word whose old meaning leaks in. Pivotal tuning (the diffusers advanced script; "pivotal" after
Roich et al. 2022) trains both: the new token carries the concept into the prompt, the LoRA teaches the model to
draw it. It is DreamBooth-LoRA (its data, prior preservation, adapters and loss) with textual inversion's tokens:
captions name the new token, the vectors train at their own rate, and after ``--ti-frac`` of the steps they stop
while the LoRA goes on (diffusers' ``train_text_encoder_ti_frac``).

Files: the LoRA in diffusers' layout (``pytorch_lora_weights.safetensors``), the embeddings as textual inversion
writes them (``learned_embeds.safetensors``: diffusers' layout, SDXL's clip_l/clip_g), and one kohya-layout LoRA
with the embeddings bundled inside (``<token>.safetensors``, ``bundle_emb.*``: what A1111 and Forge load).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MethodSpec, RunConfig, opt
from ..errors import ConceptorError
from ..models.load import Components
from ..training.method import Setup, Shard
from .dreambooth import DreamBooth
from .textual_inversion import TokenVectors, slug
from .trainset import datasets_of

log = logging.getLogger("conceptor")


@dataclass
class PivotalConfig:
    token: str = opt("", "the new token, e.g. '<sks>' (a dataset config may give each subset its own)")
    init_token: str = opt("", "existing word(s) to start its vectors from, e.g. dog; several words (or a word the "
                              "tokenizer splits into pieces) start from their mean, e.g. 'red toy' (default: random "
                              "vectors at the vocabulary's scale, as diffusers' script)")
    vectors: int = opt(2, "vectors per token (default 2, as diffusers' script)", metavar="N")
    instance_prompt: str | None = opt(None, "prompt of your images with the token or {}: 'a photo of {} dog' "
                                            "(default: the templates of --what; caption files win)", metavar="P")
    what: str = opt("object", "template set when there is no prompt (default object)", choices=("object", "style"))
    templates: str | None = opt(None, "own templates, one per line with {} for the token", metavar="FILE",
                                input=True)
    init_embedding: str | None = opt(None, "continue training this embedding file (diffusers, A1111, kohya, SDXL "
                                           "clip_l/clip_g) instead of starting from --init-token", metavar="FILE",
                                     input=True)
    embedding_lr: float = opt(5e-4, "learning rate of the token vectors (default 5e-4; --lr is the LoRA's)",
                              metavar="F")
    ti_frac: float = opt(0.5, "train the vectors for this fraction of the steps, then only the LoRA "
                              "(default 0.5, as diffusers' train_text_encoder_ti_frac)", metavar="F")
    class_prompt: str | None = opt(None, "the class without the token ('a photo of a dog'): turns on prior "
                                         "preservation", metavar="P")
    class_images: str | None = opt(None, "class images; missing ones are generated here (default "
                                         "OUTPUT/class_images)", metavar="DIR", input=True)
    num_class_images: int = opt(100, "class images to use (default 100)", metavar="N")
    prior_loss_weight: float = opt(1.0, "weight of the class loss (default 1.0)", metavar="F")
    class_sampling_steps: int = opt(25, "sampler steps per class image (default 25)", metavar="N")
    class_guidance: float | None = opt(None, "guidance for class images (default: the model's)", metavar="F")
    text_encoder_lr: float | None = opt(None, "learning rate of the text encoders' LoRA, with --lora-text-encoder "
                                              "(default --lr)", metavar="F")


def _checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    pv, d = cfg.options, cfg.data
    file = d.dataset_file()
    return [
        (d.images or d.dataset, "--images is required: a folder with 3-20 pictures of your concept (or --dataset)"),
        (bool(pv.token) or file, "--token is required, e.g. --token '<sks>'"),
        (1 <= pv.vectors <= 64, "--vectors must be between 1 and 64"),
        (pv.embedding_lr > 0, "--embedding-lr must be positive"),
        (0 < pv.ti_frac <= 1, "--ti-frac must be in (0, 1]: the share of steps the vectors train"),
        (not pv.instance_prompt or "{}" in pv.instance_prompt or (pv.token and pv.token in pv.instance_prompt),
         "--instance-prompt must contain the token or {} where it goes, e.g. 'a photo of {} dog'"),
        (not (pv.instance_prompt and file), "--instance-prompt does nothing with a dataset config: set class_tokens "
                                            "per subset there"),
        (pv.num_class_images >= 1, "--num-class-images must be at least 1"),
        (pv.class_sampling_steps >= 1, "--class-sampling-steps must be at least 1"),
        (pv.prior_loss_weight >= 0, "--prior-loss-weight must be >= 0"),
        (pv.class_images is None or pv.class_prompt, "--class-images needs --class-prompt"),
        (pv.text_encoder_lr is None or pv.text_encoder_lr > 0, "--text-encoder-lr must be positive"),
    ]


class Pivotal(TokenVectors, DreamBooth):
    name = "pivotal"
    random_init_ok = True  # no --init-token: random vectors (textual inversion asks for a word)

    def setup(self, components: Components, cfg: RunConfig, device: torch.device, shard: Shard = Shard()) -> Setup:
        pv = cfg.options
        # DreamBooth's set-up with what pivotal tuning adds: the tokens (before anything is encoded), their vectors
        # as a param group of their own, and captions that always run through the text encoder.
        self._pivotal = pv
        setup = DreamBooth.setup(self, components, cfg, device, shard)
        self.add_concept_tokens(components, self.data, self._source, pv)
        self.encode_live = True  # the vectors train: every caption is encoded with gradients
        for _, te in components.clip_encoders:
            te.train(self.text_trains)
        self.freeze_at = math.ceil(pv.ti_frac * cfg.train.steps)
        setup.groups.append({"params": [e.new for e in self.embeddings], "lr": pv.embedding_lr})
        log.info("pivotal: vectors of %s train for %d of %d steps (lr %g), the LoRA for all (lr %g)",
                 ", ".join(self.tokens), self.freeze_at, cfg.train.steps, pv.embedding_lr, cfg.optim.lr)
        return setup

    # -- DreamBooth's hooks ------------------------------------------------------------------------------
    def _datasets(self, cfg: RunConfig):
        """--images' subset reads caption files (they name the token), else the instance prompt or templates."""
        pv = cfg.options
        datasets, source = datasets_of(cfg, class_tokens=pv.instance_prompt or None, captions="auto",
                                       token=pv.token or None)
        self._source = source
        return datasets, source

    def _check_captions(self, ts, source: str) -> None:
        """Concept items are captioned by their caption, class_tokens or the templates (checked when the tokens
        are added); a regularisation item needs its caption or class_tokens."""
        for i, it in enumerate(ts.items):
            if ts.subset_of(i).is_reg and it.caption is None and not ts.subset_of(i).class_tokens:
                raise ConceptorError(f"{source}: {ts.subset_of(i).name}: {it.example.where} has no caption file and "
                                     "the subset no class_tokens")

    def _base_caption(self, i: int, rng) -> str:
        if self.captions[i] is None:  # regularisation: the class caption, no token
            return DreamBooth._base_caption(self, i, rng)
        return self.concept_caption(i, rng.randrange(1 << 30))

    def _captions(self, index: list[int], micro_index: int, first_row: int = 0) -> list[str]:
        return [self.prompt(c) for c in DreamBooth._captions(self, index, micro_index, first_row)]

    def loss(self, micro_index: int, generator: torch.Generator) -> torch.Tensor:
        # The vectors stop at --ti-frac on every process alike (training/optim skips frozen parameters, so
        # AdamW's momentum cannot move them either); a resumed run freezes them at the same step.
        frozen = micro_index // self.cfg.train.grad_accum >= self.freeze_at
        for e in self.embeddings:
            e.new.requires_grad_(not frozen)
        return DreamBooth.loss(self, micro_index, generator)

    # -- state and files ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**DreamBooth.state_dict(self), **self.vectors_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_vectors_state(state)
        DreamBooth.load_state_dict(self, {k: v for k, v in state.items() if k not in ("vectors", "vectors_2")})

    def save(self, folder: Path, step: int, final: bool) -> list[Path]:
        from ..formats.bundle import write_bundle
        from ..formats.lora import lora_from_peft

        files = DreamBooth.save(self, folder, step, final) + self.save_embeddings(folder, step, final)
        lora = {}
        for name, m in self._modules().items():
            lora.update(lora_from_peft(m, name))
        stem = "-".join(slug(t) for t in self.tokens)
        name = f"{stem}.safetensors" if final else f"{stem}-steps-{step}.safetensors"
        metadata = self.provenance.metadata("lora", step, final, trigger=" ".join(self.tokens))
        return files + [write_bundle(lora, self.token_embeddings(), Path(folder) / name, metadata=metadata)]

    def trigger(self) -> str | None:
        return " ".join(self.tokens) if getattr(self, "tokens", None) else None


SPEC = MethodSpec(name="pivotal", section="pivotal", options=PivotalConfig, make=Pivotal,
                  help="new token vectors and a LoRA together (pivotal tuning), with prior preservation",
                  lr=1e-4, lora_lr=1e-4, flip_p=0.5, checks=_checks, lora_always=True)


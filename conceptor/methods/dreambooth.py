"""DreamBooth (Ruiz et al. 2022): fine-tune the UNet (whole, or a LoRA of it) on a few instance images
bound to a rare token, with the class prior kept by training on the model's own class images alongside.

Same loop as every method. Instance and class latents are cached once (VAE posteriors); with a frozen
text encoder the two prompts are encoded once too, so a step is one UNet forward/backward on
[instance batch | class batch] and nothing else.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import MethodSpec, RunConfig, opt
from ..data.dataset import caption_rng, realise, shorthand, with_subset
from ..data.images import IMAGE_EXTS, list_images
from ..data.order import EntryOrder
from ..errors import ConceptorError
from ..fileio import atomic_path
from ..models.adapters import (
    add_adapters,
    load_trained_state,
    save_adapters,
    train_whole,
    trainable_text_encoders,
    trained_state,
)
from ..models.load import Components
from ..models.save import save_pipeline
from ..models.text import added_conditioning, encode, token_ids
from ..sampling.pipeline import check_vae_memory
from ..training.method import Setup, Shard
from .denoise import LatentSet, denoising_loss, validation_loss
from .provenance import Provenance
from .trainset import any_flips, datasets_of, flip_probabilities, training_set

log = logging.getLogger("conceptor")


def ensure_class_images(components: Components, folder: Path, prompt: str, n: int, *, steps: int,
                        guidance: float | None, batch_size: int = 4, seed: int = 0) -> list[Path]:
    """``n`` class images in ``folder``: those there are used, the missing ones generated with the model.

    Image ``class-00042.png`` always comes from seed 42, and each file is written as soon as it exists,
    so an interrupted run picks up where it stopped and a rerun reproduces the same set.
    """
    from ..sampling.pipeline import sample

    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith("."))
    if len(have) < n:
        taken = {p.name for p in have}
        todo = [i for i in range(10 * n + len(have)) if f"class-{i:05d}.png" not in taken][: n - len(have)]
        log.info("generating %d class image(s) of %r into %s", len(todo), prompt, folder)
        with tqdm(total=len(todo), desc="class images", unit="img") as bar:
            for k in range(0, len(todo), batch_size):
                chunk = todo[k:k + batch_size]
                images = sample(components, [prompt] * len(chunk), [seed + i for i in chunk], steps=steps,
                                guidance=guidance, batch_size=batch_size)
                for i, image in zip(chunk, images):
                    with atomic_path(folder / f"class-{i:05d}.png") as tmp:
                        image.save(tmp, format="PNG")
                bar.update(len(chunk))
    return list_images(folder)[:n]


@dataclass
class DreamBoothConfig:
    instance_prompt: str = opt("", "prompt of your images with a rare token: 'a photo of sks toy'", metavar="P")
    class_prompt: str | None = opt(None, "the class without the token ('a photo of a toy'): turns on prior "
                                         "preservation", metavar="P")
    class_images: str | None = opt(None, "class images; missing ones are generated here (default "
                                         "OUTPUT/class_images)", metavar="DIR", input=True)
    num_class_images: int = opt(100, "class images to use (default 100)", metavar="N")
    prior_loss_weight: float = opt(1.0, "weight of the class loss (default 1.0)", metavar="F")
    class_sampling_steps: int = opt(25, "sampler steps per class image (default 25)", metavar="N")
    class_guidance: float | None = opt(None, "guidance for class images (default: the model's)", metavar="F")
    train_text_encoder: bool = opt(False, "fine-tune the text encoder too (full DreamBooth)")
    text_encoder_lr: float | None = opt(None, "learning rate of the text encoder (default --lr)", metavar="F")
    save_single_file: bool = opt(False, "also write OUTPUT/model.safetensors (A1111/ComfyUI)")


def _checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    db, lora = cfg.options, cfg.lora
    images = cfg.data.images
    return [
        (images or cfg.data.dataset, "--images is required: a folder with 3-20 pictures of your concept (or "
                                     "--dataset: a kohya dataset config or a captioned source)"),
        (bool(db.instance_prompt) or not images, "--instance-prompt is required, e.g. 'a photo of sks toy'"),
        (not (db.instance_prompt and cfg.data.dataset_file()),
         "--instance-prompt does nothing with a dataset config: set class_tokens per subset there"),
        (not (db.instance_prompt and cfg.data.dataset and not cfg.data.dataset_file()),
         "--instance-prompt does nothing with --dataset SRC: every row there has its own caption"),
        (db.num_class_images >= 1, "--num-class-images must be at least 1"),
        (db.class_sampling_steps >= 1, "--class-sampling-steps must be at least 1"),
        (db.prior_loss_weight >= 0, "--prior-loss-weight must be >= 0"),
        (not (lora.enabled and db.train_text_encoder),
         "with --lora, train the text encoder as a LoRA too: --lora-text-encoder (not --train-text-encoder)"),
        (not (lora.enabled and db.save_single_file),
         "--save-single-file writes a full model; a LoRA run writes pytorch_lora_weights.safetensors"),
        (db.class_images is None or db.class_prompt,
         "--class-images needs --class-prompt (the prompt its images show, e.g. 'a photo of a toy')"),
        (db.text_encoder_lr is None or db.text_encoder_lr > 0, "--text-encoder-lr must be positive"),
        (not (images and db.class_images and Path(db.class_images).resolve() == Path(images).resolve()),
         "--class-images must be another folder than --images (class images are generic)"),
    ]


class DreamBooth:
    name = "dreambooth"

    def setup(self, components: Components, cfg: RunConfig, device: torch.device, shard: Shard = Shard()) -> Setup:
        db = self.db = cfg.options
        self.lora = cfg.lora.enabled
        self.c, self.cfg, self.device, self.shard = components, cfg, device, shard
        if getattr(db, "save_single_file", False) and components.flow is not None:
            raise ConceptorError("--save-single-file writes the SD 1/2/XL checkpoint layout; for SD3/Flux use the "
                                 "diffusers folder the run writes")
        datasets, source = self._datasets(cfg)
        class_paths = None
        if db.class_prompt:  # before any weight changes: class images show what the base model knows
            folder = Path(db.class_images) if db.class_images else Path(cfg.train.output) / "class_images"
            class_paths = ensure_class_images(components, folder, db.class_prompt, db.num_class_images,
                                              steps=db.class_sampling_steps, guidance=db.class_guidance,
                                              seed=cfg.train.seed)
            generated = shorthand("class images", image_dir=str(folder), class_tokens=db.class_prompt,
                                  caption_extension=None, flip=cfg.data.flip_p > 0, is_reg=True).subsets[0]
            datasets = [with_subset(datasets[0], generated)] + datasets[1:]
        ts = self.data = training_set(cfg, components, datasets, source)
        self.provenance = Provenance(cfg, components, ts)  # the base model's fingerprint, before anything trains
        if class_paths is not None:  # the folder may hold more than --num-class-images: use those asked for
            keep, reg = {Path(p).resolve() for p in class_paths}, len(datasets[0].subsets) - 1
            ts.items = [it for it in ts.items if it.subset != reg or it.example.path.resolve() in keep]
        self._check_captions(ts, source)
        # Before any image is resized to its size (PIL alone would allocate it), not after.
        w, h = max((it.size for it in ts.items), key=lambda s: s[0] * s[1])
        check_vae_memory(components.vae, 1, h, w, f"--resolution {max(w, h)}", "VAE encoder")
        flip = any_flips(ts, cfg.data.flip_p)
        self.instance = LatentSet(components, ts, ts.indices(False), flip, "caching instance latents")
        self.prior = LatentSet(components, ts, ts.indices(True), flip, "caching class latents") \
            if ts.indices(True) else None
        sizes = [it.size for it in ts.items]
        n = cfg.train.batch_size * shard.world
        self.order = EntryOrder(ts.entries(False), sizes, n, cfg.train.seed)
        # A stream of its own (seed + 1) so the class images cycle independently of the instances.
        self.prior_order = EntryOrder(ts.entries(True), sizes, n, cfg.train.seed + 1) if self.prior else None

        # the text encoders' weights train (pivotal tuning's section has no --train-text-encoder: LoRA only)
        self.text_trains = getattr(db, "train_text_encoder", False) or cfg.lora.text_encoder
        self.encode_live = self.text_trains  # prompts are encoded every step (with gradients), not once
        self._encoded: dict[str, tuple] = {}  # caption -> (hidden, pooled), while nothing in the text path trains

        denoiser = components.denoiser
        groups = []
        te_lr = db.text_encoder_lr or cfg.optim.lr
        if self.lora:  # SDXL/SD3: both CLIP text encoders, with --lora-text-encoder
            groups = add_adapters(self._modules(), cfg.lora, te_lr, cfg.train.seed, components.flow)
        else:
            groups.append({"params": train_whole(denoiser)})
            if getattr(db, "train_text_encoder", False):
                for te in trainable_text_encoders(components).values():
                    groups.append({"params": train_whole(te), "lr": te_lr})
        denoiser.train()
        for te in trainable_text_encoders(components).values():
            te.train(self.text_trains)
            if cfg.train.gradient_checkpointing and self.text_trains:
                te.gradient_checkpointing_enable()
        if cfg.train.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        n = sum(p.numel() for g in groups for p in g["params"])
        log.info("%s%s: %d instance image(s)%s, %.1fM trainable parameters", self.name, " LoRA" if self.lora else "",
                 self.instance.n, f", {self.prior.n} class image(s)" if self.prior else " (no prior preservation)",
                 n / 1e6)
        return Setup(groups)

    # -- what a subclass (pivotal tuning) changes ---------------------------------------------------
    def _datasets(self, cfg: RunConfig):
        """The run's datasets: --images' one subset is captioned by the instance prompt (no caption files)."""
        return datasets_of(cfg, class_tokens=cfg.options.instance_prompt or None, captions=None)

    def _check_captions(self, ts, source: str) -> None:
        for i, it in enumerate(ts.items):
            if it.caption is None and not ts.subset_of(i).class_tokens:
                raise ConceptorError(f"{source}: {ts.subset_of(i).name}: {it.example.where} has no caption file "
                                     "and the subset no class_tokens; give it class_tokens (e.g. 'sks dog')")

    def _base_caption(self, i: int, rng) -> str:
        """Item i's caption before the subset's caption options: its own, or its subset's class_tokens."""
        return self.data.items[i].caption or self.data.subset_of(i).class_tokens

    # -- per step --------------------------------------------------------------------------------
    def _captions(self, index: list[int], micro_index: int, first_row: int = 0) -> list[str]:
        """Each row's caption this step: its own or its subset's class_tokens, through the subset's caption
        options (prefix/suffix, shuffle with keep_tokens, tag and caption dropout)."""
        ts, seed = self.data, self.cfg.train.seed
        out = []
        for row, i in enumerate(index):
            rng = caption_rng(seed, micro_index, first_row + row)
            out.append(realise(self._base_caption(i, rng), ts.subset_of(i), rng))
        return out

    def _text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, pooled) of the rows' captions: encoded now when the text path trains, else once per caption."""
        if self.encode_live:
            return encode(self.c, token_ids(self.c, captions))
        with torch.no_grad():
            for text in captions:
                if text not in self._encoded:
                    if len(self._encoded) > 4096:  # shuffled captions: keep memory bounded
                        self._encoded.clear()
                    self._encoded[text] = encode(self.c, token_ids(self.c, [text]))
        hidden = torch.cat([self._encoded[t][0] for t in captions])
        pooled = torch.cat([self._encoded[t][1] for t in captions]) if self._encoded[captions[0]][1] is not None \
            else None
        return hidden, pooled

    def _added(self, pooled: torch.Tensor | None, item: int) -> dict | None:
        """SDXL's size conditioning at item ``item``'s training size (a batch shares one size)."""
        w, h = self.data.items[item].size
        return added_conditioning(self.c, pooled, (h, w))

    def loss(self, micro_index: int, generator: torch.Generator) -> torch.Tensor:
        cfg, shard, ts = self.cfg, self.shard, self.data
        idx = self.order(micro_index)  # the global batch: n instance rows, then n class rows
        n = len(idx)
        mine = shard.rows(n)
        if not mine:  # a short last batch of a bucket can leave a process empty; it still joins the average
            return sum(p.sum() * 0.0 for g in self._modules().values() for p in g.parameters() if p.requires_grad)
        weight = cfg.data.mask_weight
        parts = [self.instance.sample(idx, flip_probabilities(ts, idx, cfg.data.flip_p), generator, rows=mine,
                                      mask_weight=weight)]
        text = [self._text(self._captions([idx[j] for j in mine], micro_index))]
        if self.prior is not None:
            cidx = self.prior_order(micro_index)[:n]
            parts.append(self.prior.sample(cidx, flip_probabilities(ts, cidx, cfg.data.flip_p), generator,
                                           rows=mine))
            text.append(self._text(self._captions([cidx[j] for j in mine], micro_index, first_row=n)))
        b = len(mine)
        # instance and class captions encoded apart: the same batches (and so the same numbers) as before subsets
        hidden = torch.cat([h for h, _ in text])
        pooled = torch.cat([p for _, p in text]) if text[0][1] is not None else None
        latents = [x for x, _ in parts]
        if len(parts) == 1 or latents[0].shape == latents[1].shape:  # one forward pass over [instance | class]
            weights = [w if w is not None else torch.ones_like(x[:, :1]) for x, w in parts]
            rows = list(mine) + ([n + j for j in mine] if len(parts) > 1 else [])
            per_sample = denoising_loss(self.c, torch.cat(latents).to(self.device), hidden, cfg.train, generator,
                                        rows=(rows, len(rows) * shard.world), added_cond=self._added(pooled, idx[0]),
                                        weight=None if all(w is None for _, w in parts) else torch.cat(weights))
        else:  # instance and class images of different sizes (buckets): one pass each
            per_sample = torch.cat([
                denoising_loss(self.c, x.to(self.device), hidden[k * b:(k + 1) * b], cfg.train, generator,
                               rows=(mine, n), weight=w,
                               added_cond=self._added(None if pooled is None else pooled[k * b:(k + 1) * b],
                                                      (idx if k == 0 else cidx)[0]))
                for k, (x, w) in enumerate(parts)])
        loss = shard.mean(per_sample[:b], n)
        if self.prior is not None:
            loss = loss + self.db.prior_loss_weight * shard.mean(per_sample[b:], n)
        return loss

    def validation_loss(self) -> float | None:
        """Fixed-noise loss on the instance images with their captions (methods/denoise.py); the caption options'
        randomness comes from a step of its own (-1), so it is the same every time."""
        idx = self.data.validation_items()
        return validation_loss(self.c, self.instance, idx, self._captions(idx, -1), self.cfg.train,
                               lambda i: self.data.items[i].size)

    # -- state and files -------------------------------------------------------------------------
    def _modules(self) -> dict[str, torch.nn.Module]:
        mods = {self.c.denoiser_name: self.c.denoiser}
        if self.text_trains:
            mods.update(trainable_text_encoders(self.c))
        return mods

    def state_dict(self) -> dict[str, torch.Tensor]:
        return trained_state(self._modules(), self.lora)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trained_state(self._modules(), state, self.lora)

    def save(self, folder: Path, step: int, final: bool) -> list[Path]:
        folder = Path(folder)
        kind = "lora" if self.lora else "checkpoint"
        metadata = self.provenance.metadata(kind, step, final, trigger=self.trigger())
        if self.lora:
            return save_adapters(self._modules(), folder, step, final, metadata)
        if not final:
            return []  # a full model per snapshot would be GBs; checkpoints/ holds the weights
        return save_pipeline(self.c, folder, self.cfg.model, self.text_trains, getattr(self.db, "save_single_file",
                                                                                       False), metadata)

    def trigger(self) -> str | None:
        """What the prompt names the concept with: the instance prompt's subject, or the first subset's."""
        text = getattr(self.db, "instance_prompt", None) or next(
            (s.class_tokens for s in self.data.subsets if not s.is_reg and s.class_tokens), None)
        return text


SPEC = MethodSpec(name="dreambooth", section="dreambooth", options=DreamBoothConfig, make=DreamBooth,
                  help="fine-tune the UNet (or a LoRA) on a subject, with prior preservation", lr=5e-6,
                  lora_lr=1e-4, flip_p=0.5, checks=_checks)

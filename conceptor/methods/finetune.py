"""Fine-tuning on an image-caption dataset (the seeds' Pokemon-BLIP recipe): the whole UNet, or a LoRA of it.

Everything that does not change during training is computed once and kept on disk (data/cache.py): the
VAE posterior of every image at its bucket size (and mirrored), and the text-encoder states of every
caption. A step is then one UNet forward/backward. With several processes (``accelerate launch``) each
takes its slice of one global batch, with noise drawn for the whole batch, so N processes x batch b are
exactly one process x batch N*b.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import LORA_TARGET_SETS, MethodSpec, RunConfig, opt
from ..data.buckets import center_crop_offset, fit
from ..data.cache import TensorCache, default_cache_dir, fingerprint, key
from ..data.dataset import caption_rng, realise
from ..data.dataset_config import Subset
from ..data.images import pil_to_tensor
from ..data.order import EntryOrder
from ..errors import ConceptorError
from ..models.adapters import add_adapters, load_trained_state, save_adapters, train_whole, trained_state
from ..models.load import Components
from ..models.save import save_pipeline
from ..models.text import encode, token_ids
from ..sampling.pipeline import check_vae_memory
from ..training.method import Setup, Shard
from .denoise import VAL_MAX_IMAGES, denoising_loss, encode_posterior, eval_mode, loss_at_levels, scale_latents
from .provenance import Provenance
from .trainset import any_flips, datasets_of, flip_probabilities, training_set

log = logging.getLogger("conceptor")


@dataclass
class FinetuneConfig:
    caption_dropout: float = opt(0.0, "probability of an empty caption (default 0; a dataset config sets "
                                      "caption_dropout_rate per subset)", metavar="F")
    random_crop: bool = opt(False, "random crops (latents then cannot be cached; default: centre crops)")
    save_single_file: bool = opt(False, "also write OUTPUT/model.safetensors (+ .yaml)")
    cache_dir: str | None = opt(None, "latent/text cache (default ~/.cache/conceptor; 'none' = off)", metavar="DIR")


def _checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    ft, d = cfg.options, cfg.data
    return [
        (bool(d.dataset), "--dataset is required: a kohya dataset config (.toml), a CSV, an image folder "
                          "(metadata.jsonl or .txt captions) or a saved Hugging Face dataset"),
        (0 <= ft.caption_dropout < 1, "--caption-dropout must be in [0, 1)"),
        (not (ft.caption_dropout and d.dataset_file()),
         "--caption-dropout and a dataset config: set caption_dropout_rate per subset in the file instead"),
        (not (cfg.lora.enabled and ft.save_single_file), "--save-single-file writes a full model, not a LoRA"),
        (not (ft.random_crop and cfg.data.center_crop), "--random-crop and --center-crop exclude each other"),
        (not (ft.random_crop and cfg.data.masks), "--random-crop cannot crop masks alike; leave one out"),
        (cfg.lora.targets in LORA_TARGET_SETS, f"--lora-targets must be one of {', '.join(LORA_TARGET_SETS)}"),
    ]


class Finetune:
    name = "finetune"

    def setup(self, components: Components, cfg: RunConfig, device: torch.device, shard: Shard = Shard()) -> Setup:
        ft = self.ft = cfg.options
        self.lora = cfg.lora.enabled
        self.c, self.cfg, self.device, self.shard = components, cfg, device, shard
        if ft.save_single_file and components.flow is not None:
            raise ConceptorError("--save-single-file writes the SD 1/2/XL checkpoint layout; for SD3/Flux use the "
                                 "diffusers folder the run writes")
        datasets, source = datasets_of(cfg, caption_dropout=ft.caption_dropout)
        ts = self.data = training_set(cfg, components, datasets, source)
        self.provenance = Provenance(cfg, components, ts)
        if any(s.is_reg for s in ts.subsets):
            raise ConceptorError(f"{source}: regularisation subsets belong to dreambooth (prior preservation); "
                                 "fine-tuning trains on every image alike: remove is_reg or train dreambooth")
        if ft.random_crop and ts.has_masks:
            raise ConceptorError(f"{source} has masks; --random-crop cannot crop them alike: leave one out")
        for i, it in enumerate(ts.items):
            if not (it.caption or ts.subset_of(i).class_tokens):
                raise ConceptorError(f"{source}: {ts.subset_of(i).name}: {it.example.where} has no caption; give "
                                     "it a caption file or its subset class_tokens")
        examples = [it.example for it in ts.items]
        sizes = [it.size for it in ts.items]
        self.examples, self.sizes = examples, sizes
        w, h = max(sizes, key=lambda s: s[0] * s[1])  # the largest bucket, before any image is resized to it
        check_vae_memory(components.vae, 1, h, w, f"--resolution {max(w, h)}", "VAE encoder")
        # SDXL's size conditioning per example: (original h, w, crop top, left, target h, w).
        self.time_ids = None if not components.is_sdxl else [
            (o[1], o[0], *center_crop_offset(o, t), t[1], t[0]) for o, t in zip((ex.size for ex in examples), sizes)]
        self.order = EntryOrder(ts.entries(), sizes, cfg.train.batch_size * self.shard.world, cfg.train.seed,
                                by_bucket=True)
        bucket_ids = set(sizes)
        per_step = cfg.train.grad_accum
        steps = math.ceil(cfg.train.epochs * self.order.per_epoch / per_step) if cfg.train.epochs else None
        cache_dir = None if (ft.cache_dir or "").lower() == "none" else Path(ft.cache_dir or default_cache_dir())
        self.cache = TensorCache(cache_dir / "tensors" if cache_dir else None)
        self.flip = any_flips(ts, cfg.data.flip_p)
        self.vae_id = fingerprint(components.vae)
        self.latents = None if ft.random_crop else self._cache_latents()
        # Each item's caption before the per-step options (prefix and suffix are fixed, so they are in it); an
        # item whose subset shuffles or drops tags is realised again every step, and encoded then.
        self.base = [realise(it.caption or ts.subset_of(i).class_tokens, ts.subset_of(i), random.Random(0), False)
                     if not _varies(ts.subset_of(i)) else "" for i, it in enumerate(ts.items)]
        self.masks = [self._mask(i) for i in range(len(examples))] if ts.has_masks else None
        self.hidden, self.empty = self._cache_text()
        log.info("finetune: %d example(s) in %d bucket(s) %s; %d micro-batches per epoch; effective batch %d "
                 "(batch %d x accumulation %d x %d process(es)); cache %s", len(examples), len(bucket_ids),
                 sorted(bucket_ids), self.order.per_epoch, cfg.train.batch_size * per_step * self.shard.world,
                 cfg.train.batch_size, per_step, self.shard.world, cache_dir or "off")

        unet = components.denoiser  # the UNet, or SD3/Flux's transformer
        params = (add_adapters(self._modules(), cfg.lora, None, cfg.train.seed, components.flow) if self.lora
                  else [{"params": train_whole(unet)}])
        unet.train()
        if cfg.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return Setup(params, steps=steps)

    # -- caches ----------------------------------------------------------------------------------
    def _pixels(self, i: int, rng: random.Random | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        image = self.examples[i].image()
        fitted, crop = fit(image, self.sizes[i], "random" if rng else "center", rng)
        if self.time_ids is not None and rng is not None:  # random crop: SDXL is told where it was
            o, t = image.size, self.sizes[i]
            self.time_ids[i] = (o[1], o[0], *crop, t[1], t[0])
        return pil_to_tensor(fitted), crop

    @torch.no_grad()
    def _cache_latents(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Posterior (mean, std) per example, [2 if flips else 1, C, h, w], from the cache or the VAE."""
        vae, out = self.c.vae, []
        for i in tqdm(range(len(self.examples)), desc="caching latents", unit="img", leave=False):
            k = key("latent", self.examples[i].image_bytes(), self.vae_id, self.sizes[i], "center", self.flip)
            hit = self.cache.get(k)
            if hit is None:
                x = self._pixels(i)[0][None]
                if self.flip:
                    x = torch.cat([x, x.flip(-1)])
                mean, std = encode_posterior(vae, x)
                hit = {"mean": mean.cpu(), "std": std.cpu()}
                self.cache.put(k, hit)
            out.append((hit["mean"], hit["std"]))
        if self.cache.folder is not None:
            log.info("latents: %d from cache, %d encoded", self.cache.hits, self.cache.misses)
        return out

    def _mask(self, i: int) -> torch.Tensor | None:
        """Item i's mask on the latent grid, [2 if flips else 1, 1, h, w], or None."""
        m = self.data.mask(i)
        if m is None:
            return None
        f = self.c.vae_scale_factor
        m = torch.nn.functional.adaptive_avg_pool2d(m[None], (self.sizes[i][1] // f, self.sizes[i][0] // f))[0]
        return torch.stack([m, m.flip(-1)]) if self.flip else m[None]

    @torch.no_grad()
    def _cache_text(self) -> tuple[list[dict], dict]:
        """Per example {"hidden"[, "pooled"]} from the cache or the text encoder(s), and the empty caption's."""
        c = self.c
        te_id = "+".join(fingerprint(te) for te in c.text_encoders)

        def encode_one(text: str) -> dict:
            k = key("text", text, te_id, c.tokenizer.model_max_length, *([c.max_sequence_length] if c.flow else []))
            hit = self.cache.get(k)
            if hit is None:
                hidden, pooled = encode(c, token_ids(c, [text]))
                hit = {"hidden": hidden[0].float().cpu()}
                if pooled is not None:
                    hit["pooled"] = pooled[0].float().cpu()
                self.cache.put(k, hit)
            return hit

        self._encode_one = encode_one
        unique = {}
        for text in tqdm(self.base, desc="caching captions", unit="caption", leave=False):
            if text not in unique:
                unique[text] = encode_one(text)
        return [unique[text] for text in self.base], encode_one("")

    # -- per step --------------------------------------------------------------------------------
    def loss(self, micro_index: int, generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        idx = self.order(micro_index)  # the global batch; this process takes its slice below
        n = len(idx)
        ts = self.data
        flips = (torch.rand(n, generator=generator) < flip_probabilities(ts, idx, cfg.data.flip_p)).tolist() \
            if self.flip else [False] * n
        rates = torch.tensor([ts.subset_of(i).caption_dropout_rate for i in idx], dtype=torch.float32)
        drop = (torch.rand(n, generator=generator) < rates).tolist()
        crop_seed = torch.randint(0, 2**31 - 1, (1,), generator=generator).item()
        mine = self.shard.rows(n)
        if not mine:  # a short last batch can leave a process empty; it still joins the gradient average
            return sum(p.sum() * 0.0 for p in self.c.denoiser.parameters() if p.requires_grad)
        if self.latents is not None:
            mean = torch.stack([self.latents[idx[j]][0][int(flips[j])] for j in mine])
            std = torch.stack([self.latents[idx[j]][1][int(flips[j])] for j in mine])
        else:  # random crops: encode this step's crops (cannot be cached)
            rng = random.Random(crop_seed)
            x = torch.stack([self._pixels(idx[j], rng)[0] for j in mine])
            x = torch.where(torch.tensor([flips[j] for j in mine]).view(-1, 1, 1, 1), x.flip(-1), x)
            mean, std = encode_posterior(self.c.vae, x)
        eps = torch.randn((n, *mean.shape[1:]), generator=generator)[mine.start:mine.stop]
        latents = scale_latents(self.c.vae, mean + std * eps)
        text = [self.empty if drop[j] else self._text(idx[j], micro_index, j) for j in mine]
        hidden = torch.stack([t["hidden"] for t in text]).to(self.device)
        added = None
        if self.c.flow is not None:  # SD3/Flux: the pooled embedding rides in added_cond
            added = {"pooled": torch.stack([t["pooled"] for t in text]).to(self.device)}
        elif self.c.is_sdxl:
            added = {"text_embeds": torch.stack([t["pooled"] for t in text]).to(self.device),
                     "time_ids": torch.tensor([self.time_ids[idx[j]] for j in mine], dtype=torch.float32,
                                              device=self.device)}
        weight = None
        if self.masks is not None and any(self.masks[idx[j]] is not None for j in mine):
            ones = torch.ones_like(latents[0, :1])
            m = torch.stack([ones if self.masks[idx[j]] is None else self.masks[idx[j]][int(flips[j]) if self.flip
                                                                                         else 0] for j in mine])
            weight = m + cfg.data.mask_weight * (1 - m)
        per_sample = denoising_loss(self.c, latents.to(self.device), hidden, cfg.train, generator,
                                    rows=(mine, n), added_cond=added, weight=weight)
        return self.shard.mean(per_sample, n)

    def _text(self, i: int, micro_index: int, row: int) -> dict:
        """Item i's encoded caption this step: cached, or (shuffled / tag-dropped subsets) realised and encoded."""
        sub = self.data.subset_of(i)
        if not _varies(sub):
            return self.hidden[i]
        text = realise(self.data.items[i].caption or sub.class_tokens, sub,
                       caption_rng(self.cfg.train.seed, micro_index, row), False)
        return self._encode_one(text)

    def validation_loss(self) -> float | None:
        """Fixed-noise loss on the first VAL_MAX_IMAGES examples with their cached captions (None with
        --random-crop: its latents are not cached)."""
        if self.latents is None or self.cfg.train.quantize:
            return None
        c, total, count = self.c, 0.0, 0
        device = next(c.denoiser.parameters()).device
        with eval_mode(c.denoiser), torch.no_grad():
            for i in self.data.validation_items()[:VAL_MAX_IMAGES]:
                x = scale_latents(c.vae, self.latents[i][0][:1]).to(device)
                text = self.hidden[i]
                added = None
                if c.flow is not None:
                    added = {"pooled": text["pooled"][None].to(device)}
                elif c.is_sdxl:
                    added = {"text_embeds": text["pooled"][None].to(device),
                             "time_ids": torch.tensor([self.time_ids[i]], dtype=torch.float32, device=device)}
                per = loss_at_levels(c, x, text["hidden"][None].to(device), self.cfg.train, added, noise_seed=i)
                total, count = total + float(per.sum()), count + 1
        return total / max(count, 1)

    # -- state and files -------------------------------------------------------------------------
    def _modules(self) -> dict[str, torch.nn.Module]:
        return {self.c.denoiser_name: self.c.denoiser}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return trained_state(self._modules(), self.lora)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trained_state(self._modules(), state, self.lora)

    def save(self, folder: Path, step: int, final: bool) -> list[Path]:
        folder = Path(folder)
        metadata = self.provenance.metadata("lora" if self.lora else "checkpoint", step, final)
        if self.lora:
            return save_adapters(self._modules(), folder, step, final, metadata)
        if not final:
            return []
        return save_pipeline(self.c, folder, self.cfg.model, False, self.ft.save_single_file, metadata)



# Flips off: a captioned dataset's look can be one-sided, and mirroring it teaches a second look
# (toyworld/style.py measured exactly that); diffusers' train_text_to_image has --random_flip opt-in too.
def _varies(sub: Subset) -> bool:
    """Its captions change from step to step (shuffled tags, dropped tags): they cannot be encoded once."""
    return sub.shuffle_caption or sub.caption_tag_dropout_rate > 0


SPEC = MethodSpec(name="finetune", section="finetune", options=FinetuneConfig, make=Finetune,
                  help="fine-tune the UNet (or a LoRA) on an image-caption dataset", lr=1e-5, lora_lr=1e-4,
                  flip_p=0.0, repeats=1, checks=_checks)

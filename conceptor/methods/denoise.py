"""What every method shares: cached VAE posteriors and the denoising loss on a batch of latents.

Caching the posterior (mean, std) of each image once and sampling it every step is exact: it is what
encoding the image again would give, without running the VAE encoder in the training loop.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.dataset import TrainingSet
from ..models.load import Components
from ..models.vae import switched_to_fp32
from ..sampling.pipeline import check_vae_memory
from ..training import diffusion as D

log = logging.getLogger("conceptor")


@torch.no_grad()
def encode_posterior(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior, fp32. A half-precision VAE that overflows (SDXL's does in fp16:
    NaN loss, black images) is switched to fp32 for the rest of the run, with a message, never silently."""
    dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    if switched_to_fp32(vae, [mean, std], "", "the VAE returns NaN/inf latents even in fp32; an input image or "
                        "the VAE weights are broken"):
        return encode_posterior(vae, x)
    return mean, std


@torch.no_grad()
def encode_latent_stats(vae, pixels: torch.Tensor, batch_size: int = 8, desc: str = "caching latents"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for each image (fp32, on the VAE's device)."""
    h, w = pixels.shape[-2:]
    check_vae_memory(vae, min(batch_size, len(pixels)), h, w, f"--resolution {h}" if h == w else f"{w}x{h} images",
                     "VAE encoder")
    means, stds = [], []
    for i in tqdm(range(0, len(pixels), batch_size), desc=desc, leave=False, disable=len(pixels) <= batch_size):
        mean, std = encode_posterior(vae, pixels[i:i + batch_size])
        means.append(mean)
        stds.append(std)
    return torch.cat(means), torch.cat(stds)


def scale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the UNet's space: (z - shift) * scaling_factor, as the model was trained."""
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return (z - shift) * float(vae.config.scaling_factor)


class LatentSet:
    """Posteriors of some items of a TrainingSet (and of their mirror images when flips are on), and their masks
    on the latent grid. Items of one training size are encoded together; a batch drawn from it never mixes
    sizes (data/order.py)."""

    def __init__(self, components: Components, data: TrainingSet, indices: list[int], flip: bool,
                 desc: str = "caching latents"):
        self.vae, self.n, self.index = components.vae, len(indices), {i: k for k, i in enumerate(indices)}
        # One [1 or 2 (flipped), m, C, h, w] block per training size; item k is block place[k][0], row place[k][1].
        # Batches index a block as one tensor (never a stack of items), which keeps the VAE's memory layout.
        self.blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.place: list[tuple[int, int]] = [None] * self.n
        self.masks: list[torch.Tensor | None] = [None] * self.n  # per item [1 or 2, 1, h, w], or None
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, i in enumerate(indices):
            by_size.setdefault(data.items[i].size, []).append(k)
        for members in by_size.values():
            pixels = torch.stack([data.pixels(indices[k]) for k in members])
            if flip:
                pixels = torch.cat([pixels, pixels.flip(-1)])
            mean, std = encode_latent_stats(components.vae, pixels, desc=desc)
            mean, std = mean.view(-1, len(members), *mean.shape[1:]), std.view(-1, len(members), *std.shape[1:])
            for j, k in enumerate(members):
                self.place[k] = (len(self.blocks), j)
                m = data.mask(indices[k])
                if m is not None:  # the share of each latent cell the concept covers (area average)
                    m = torch.nn.functional.adaptive_avg_pool2d(m[None], mean.shape[-2:])[0]
                    self.masks[k] = torch.stack([m, m.flip(-1)]) if flip else m[None]
            self.blocks.append((mean, std))

    def means(self, index: list[int]) -> torch.Tensor:
        """Scaled posterior means (unflipped) of items ``index``, all of one training size."""
        places = [self.place[self.index[i]] for i in index]
        block = self.blocks[places[0][0]][0]
        return scale_latents(self.vae, block[0, torch.tensor([p[1] for p in places])])

    def sample(self, index: list[int], flip_p: float, generator: torch.Generator, rows: range | None = None,
               mask_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scaled latents of items ``index`` (TrainingSet indices), each flipped with probability ``flip_p``, and
        their loss weights per latent cell (1 on the mask, ``mask_weight`` off it; None when no item is masked).

        Flips and noise are drawn for all of ``index`` (a global batch); ``rows`` keeps this process's part.
        """
        b = len(index)
        block = {self.place[self.index[i]][0] for i in index}
        if len(block) > 1:
            raise ValueError("a batch mixes training sizes; data/order.py batches one size at a time")
        mean_all, std_all = self.blocks[block.pop()]
        flips = (torch.rand(b, generator=generator) < flip_p).long() if _any(flip_p) and len(mean_all) > 1 \
            else torch.zeros(b, dtype=torch.long)
        eps = torch.randn((b, *mean_all.shape[2:]), generator=generator)
        keep = slice(None) if rows is None else slice(rows.start, rows.stop)
        ks = [self.index[i] for i in index][keep]
        rows_in_block = torch.tensor([self.place[k][1] for k in ks])
        mean, std = mean_all[flips[keep], rows_in_block], std_all[flips[keep], rows_in_block]
        latents = scale_latents(self.vae, mean + std * eps[keep].to(mean.device))
        fl = flips[keep].tolist()
        if all(self.masks[k] is None for k in ks):
            return latents, None
        ones = torch.ones_like(mean[0, :1])
        m = torch.stack([ones if self.masks[k] is None else self.masks[k][f].to(ones.device) for k, f in zip(ks, fl)])
        return latents, m + mask_weight * (1 - m)


def _any(p: float | torch.Tensor) -> bool:
    return bool((torch.as_tensor(p) > 0).any())


def denoising_loss(components: Components, latents: torch.Tensor, hidden: torch.Tensor, train: TrainConfig,
                   generator: torch.Generator, rows: tuple[Sequence[int], int] | None = None,
                   added_cond: dict | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample diffusion loss (noise, timestep, UNet prediction, min-SNR weight) of a batch, fp32; ``weight``
    (per latent cell, from LatentSet.sample) masks it.

    ``rows=(indices, total)``: ``latents`` are those rows of a global batch of ``total`` split across
    processes; noise and timesteps are drawn for all ``total`` rows and indexed, so N processes with
    batch b train on exactly what one process with batch N*b would.
    """
    c = components
    if c.flow is not None:  # SD3, Flux: rectified flow, the pooled embedding rides in added_cond
        from ..families.flow import flow_loss, settings_of

        return flow_loss(c, latents, hidden, added_cond["pooled"], settings_of(train), generator, rows, weight)
    acp = c.scheduler.alphas_cumprod.to(latents.device)
    indices, total = rows or (range(len(latents)), len(latents))
    pick = torch.as_tensor(list(indices), dtype=torch.long)
    noise = D.offset_noise(torch.randn((total, *latents.shape[1:]), generator=generator), train.noise_offset,
                           generator)[pick]
    t = D.sample_timesteps(total, c.scheduler.config.num_train_timesteps, generator, low=train.min_timestep or 0,
                           high=train.max_timestep)[pick]
    noise, t = noise.to(latents.device), t.to(latents.device)
    noisy = D.add_noise(latents, noise, t, acp)
    dtype = next(c.unet.parameters()).dtype
    if added_cond is not None:  # SDXL: pooled text embedding and size ids, in the UNet's dtype
        added_cond = {k: v.to(dtype) for k, v in added_cond.items()}
    pred = c.unet(noisy.to(dtype), t, hidden.to(dtype), added_cond_kwargs=added_cond).sample
    target = D.target_for(c.prediction_type, latents, noise, t, acp)
    per_sample = D.mse_per_sample(pred, target, weight)
    if train.snr_gamma:
        per_sample = per_sample * D.min_snr_weight(D.snr(t, acp), train.snr_gamma, c.prediction_type)
    return per_sample


# Validation loss (issue 23): the denoising loss at fixed noise levels with fixed noise, on the posterior means of
# a fixed set of images, so two evaluations of the same weights give the same number and a curve over steps
# compares like with like (the training loss draws new levels and noise every step, which is most of its noise).
VAL_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)  # fractions of the schedule: DDPM timesteps / flow-matching sigmas
VAL_MAX_IMAGES = 32


@torch.no_grad()
def loss_at_levels(components: Components, latents: torch.Tensor, hidden: torch.Tensor, train: TrainConfig,
                   added_cond: dict | None, noise_seed: int) -> torch.Tensor:
    """Per-sample loss averaged over VAL_LEVELS, with noise drawn from ``noise_seed`` alone."""
    c = components
    n = len(latents)
    g = torch.Generator().manual_seed(noise_seed)
    per_level = []
    for level in VAL_LEVELS:
        noise = torch.randn(latents.shape, generator=g).to(latents.device)
        if c.flow is not None:
            from ..families.flow import flow_loss_at, settings_of

            s = settings_of(train)
            sigmas = torch.full((n,), level, device=latents.device)
            per_level.append(flow_loss_at(c, c.flow, latents, noise, sigmas, hidden, added_cond["pooled"], "none",
                                          s.guidance_scale, s.x0_loss))
            continue
        acp = c.scheduler.alphas_cumprod.to(latents.device)
        t = torch.full((n,), int(level * c.scheduler.config.num_train_timesteps), dtype=torch.long,
                       device=latents.device)
        dtype = next(c.unet.parameters()).dtype
        added = {k: v.to(dtype) for k, v in added_cond.items()} if added_cond is not None else None
        noisy = D.add_noise(latents, noise, t, acp).to(dtype)
        pred = c.unet(noisy, t, hidden.to(dtype), added_cond_kwargs=added).sample
        per_level.append(D.mse_per_sample(pred, D.target_for(c.prediction_type, latents, noise, t, acp)))
    return torch.stack(per_level).mean(0)


class eval_mode:
    """Modules in eval mode for a measurement, then back as they were."""

    def __init__(self, *modules):
        self.modules = [m for m in modules if m is not None]

    def __enter__(self):
        self.was = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, was in zip(self.modules, self.was):
            m.train(was)


def validation_loss(components: Components, latents: "LatentSet", index: list[int], captions: list[str],
                    train: TrainConfig, size_of) -> float | None:
    """The fixed-noise loss of items ``index`` (TrainingSet indices, at most VAL_MAX_IMAGES) with ``captions``:
    one batch per training size; item k's noise comes from seed k, whatever the batching."""
    from ..models.text import added_conditioning, encode, token_ids

    c = components
    if train.quantize:  # bitsandbytes' 4-bit layers reject the one-image no-grad batches; not measured there
        return None
    index, captions = index[:VAL_MAX_IMAGES], captions[:VAL_MAX_IMAGES]
    total, count = 0.0, 0
    with eval_mode(c.denoiser, *c.text_encoders), torch.no_grad():
        for k, (i, text) in enumerate(zip(index, captions)):  # one item at a time: its noise is its own
            x = latents.means([i]).to(next(c.denoiser.parameters()).device)
            hidden, pooled = encode(c, token_ids(c, [text]))
            w, h = size_of(i)
            per = loss_at_levels(c, x, hidden, train, added_conditioning(c, pooled, (h, w)), noise_seed=k)
            total, count = total + float(per.sum()), count + len(per)
    return total / max(count, 1)

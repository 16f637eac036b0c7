"""Textual inversion (Gal et al. 2022): learn new token vectors; text encoder, UNet and VAE stay frozen.

Faster than the seeds' recipe in two ways, both exact: VAE latents are computed once per image (and
flip) and only their Gaussian is sampled each step; the optimizer holds only the new vectors, not the
whole embedding matrix (see models/tokens.py). The text encoder still runs every step, as it must.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data.images import list_images, load_image, read_caption, to_tensor
from ..data.order import batch_indices
from ..data.templates import fill, load_templates
from ..errors import ConceptorError
from ..formats.embeddings import Embedding, write_embedding
from ..models.load import Components
from ..models.tokens import add_tokens, check_new_token, expand_prompt, initializer_id, token_names
from ..training import diffusion as D

log = logging.getLogger("conceptor")


@torch.no_grad()
def encode_latent_stats(vae, pixels: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for each image; sampling them later equals encoding again."""
    means, stds = [], []
    for i in tqdm(range(0, len(pixels), batch_size), desc="caching latents", leave=False,
                  disable=len(pixels) <= batch_size):
        dist = vae.encode(pixels[i:i + batch_size].to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


class TextualInversion:
    name = "textual-inversion"

    def setup(self, components: Components, cfg: RunConfig, device: torch.device) -> list[torch.nn.Parameter]:
        ti = cfg.textual_inversion
        self.c, self.cfg, self.device = components, cfg, device
        self.token, self.num_vectors = ti.token, ti.vectors
        tok = components.tokenizer
        for name in token_names(ti.token, ti.vectors):
            check_new_token(tok, name)
        init_id = initializer_id(tok, ti.init_token)
        templates = load_templates(ti.what, ti.templates)

        resolution = cfg.data.resolution or components.default_resolution
        paths = list_images(cfg.data.images)
        images = [load_image(p) for p in paths]
        # A sidecar caption replaces the templates for its image ("{}" or the token marks the concept).
        self.captions: list[list[str]] = []
        for p in paths:
            caption = read_caption(p)
            if caption is not None and "{}" not in caption and ti.token not in caption:
                raise ConceptorError(f"caption {p.with_suffix('.txt')} must contain {ti.token} or {{}} where the concept goes")
            self.captions.append([caption] if caption else templates)

        pixels = torch.stack([to_tensor(im, resolution, cfg.data.center_crop) for im in images])
        if cfg.data.flip_p > 0:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        mean, std = encode_latent_stats(components.vae, pixels)
        n = len(paths)
        self.num_items = n
        self.latent_mean, self.latent_std = mean.view(-1, n, *mean.shape[1:]), std.view(-1, n, *std.shape[1:])
        self.scaling = float(components.vae.config.scaling_factor)
        self.shift = float(getattr(components.vae.config, "shift_factor", None) or 0.0)
        self.alphas_cumprod = components.scheduler.alphas_cumprod.to(device)
        self.num_timesteps = components.scheduler.config.num_train_timesteps

        init = components.text_encoder.get_input_embeddings().weight[init_id].detach().float()
        self.embedding = add_tokens(tok, components.text_encoder, ti.token, init.repeat(ti.vectors, 1))
        self.first_trained_row = self.embedding.new.shape[0] - ti.vectors
        self._ids_cache: dict[str, torch.Tensor] = {}
        log.info("textual inversion: %d image(s) at %dpx, token %s x%d vector(s) initialised from %r",
                 n, resolution, ti.token, ti.vectors, ti.init_token)
        return [self.embedding.new]

    # -- per step --------------------------------------------------------------------------------
    def _ids(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for p in prompts:
            if p not in self._ids_cache:
                tok = self.c.tokenizer
                self._ids_cache[p] = tok(self.prompt(p), padding="max_length", truncation=True,
                                         max_length=tok.model_max_length, return_tensors="pt").input_ids[0]
            rows.append(self._ids_cache[p])
        return torch.stack(rows).to(self.device)

    def loss(self, micro_index: int, generator: torch.Generator) -> torch.Tensor:
        cfg, c = self.cfg, self.c
        idx = batch_indices(micro_index, cfg.train.batch_size, self.num_items, cfg.data.repeats, cfg.train.seed)
        b = len(idx)
        flips = (torch.rand(b, generator=generator) < cfg.data.flip_p).long() if cfg.data.flip_p > 0 \
            else torch.zeros(b, dtype=torch.long)
        choice = torch.randint(0, 1 << 30, (b,), generator=generator).tolist()
        prompts = [fill(self.captions[i][k % len(self.captions[i])], self.token) for i, k in zip(idx, choice)]
        index = torch.tensor(idx)
        mean, std = self.latent_mean[flips, index], self.latent_std[flips, index]
        eps = torch.randn(mean.shape, generator=generator)
        latents = ((mean + std * eps.to(mean.device)) - self.shift) * self.scaling

        noise = D.offset_noise(torch.randn(latents.shape, generator=generator), cfg.train.noise_offset, generator)
        t = D.sample_timesteps(b, self.num_timesteps, generator)
        noise, t = noise.to(self.device), t.to(self.device)
        noisy = D.add_noise(latents, noise, t, self.alphas_cumprod)
        hidden = c.text_encoder(self._ids(prompts))[0]
        pred = c.unet(noisy.to(c.unet.dtype), t, hidden.to(c.unet.dtype)).sample
        target = D.target_for(c.prediction_type, latents, noise, t, self.alphas_cumprod)
        weights = None
        if cfg.train.snr_gamma:
            weights = D.min_snr_weight(D.snr(t, self.alphas_cumprod), cfg.train.snr_gamma, c.prediction_type)
        return D.diffusion_loss(pred, target, weights)

    # -- state and files -------------------------------------------------------------------------
    def vectors(self) -> torch.Tensor:
        return self.embedding.new[self.first_trained_row:].detach().float().cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"vectors": self.vectors().contiguous()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        v = state["vectors"]
        if v.shape != self.vectors().shape:
            raise ConceptorError(f"checkpoint holds {tuple(v.shape)} vectors but this run trains "
                                 f"{tuple(self.vectors().shape)}; resume with the same --vectors and model")
        with torch.no_grad():
            self.embedding.new[self.first_trained_row:] = v.to(self.embedding.new.device)

    def save(self, folder: Path, step: int, final: bool) -> list[Path]:
        emb = Embedding(token=self.token, vectors=self.vectors())
        name = "learned_embeds.safetensors" if final else f"learned_embeds-steps-{step}.safetensors"
        path = Path(folder) / name
        write_embedding(emb, path, "diffusers")
        return [path]

    def prompt(self, text: str) -> str:
        return expand_prompt(text, {self.token: self.num_vectors})

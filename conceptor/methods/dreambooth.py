"""DreamBooth (Ruiz et al. 2022): fine-tune the UNet (whole, or a LoRA of it) on a few instance images
bound to a rare token, with the class prior kept by training on the model's own class images alongside.

Same loop as every method. Instance and class latents are cached once (VAE posteriors); with a frozen
text encoder the two prompts are encoded once too, so a step is one UNet forward/backward on
[instance batch | class batch] and nothing else.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data.images import IMAGE_EXTS, list_images, load_image, to_tensor
from ..data.order import batch_indices
from ..errors import ConceptorError
from ..fileio import atomic_dir, atomic_path
from ..formats.lora import lora_from_peft, write_lora
from ..models.load import Components
from .denoise import LatentSet, denoising_loss

log = logging.getLogger("conceptor")

# The attention projections, as the diffusers/kohya DreamBooth-LoRA recipes target them.
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_FILE = "pytorch_lora_weights.safetensors"


def ensure_class_images(components: Components, folder: Path, prompt: str, n: int, *, steps: int,
                        guidance: float, batch_size: int = 4, seed: int = 0) -> list[Path]:
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


def _peft_config(rank: int, alpha: float | None, targets: list[str]):
    from peft import LoraConfig

    # Gaussian A, zero B: the adapted model starts exactly equal to the base one.
    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)


class DreamBooth:
    name = "dreambooth"

    def setup(self, components: Components, cfg: RunConfig, device: torch.device) -> list:
        db = self.db = cfg.dreambooth
        self.c, self.cfg, self.device = components, cfg, device
        resolution = cfg.data.resolution or components.default_resolution

        def latents(paths, desc):
            pixels = torch.stack([to_tensor(load_image(p), resolution, cfg.data.center_crop) for p in paths])
            return LatentSet(components, pixels, flip=cfg.data.flip_p > 0, desc=desc)

        self.instance = latents(list_images(cfg.data.images), "caching instance latents")
        self.prior = None
        if db.class_prompt:  # before any weight changes: class images show what the base model knows
            folder = Path(db.class_images) if db.class_images else Path(cfg.train.output) / "class_images"
            paths = ensure_class_images(components, folder, db.class_prompt, db.num_class_images,
                                        steps=db.class_sampling_steps, guidance=db.class_guidance,
                                        seed=cfg.train.seed)
            self.prior = latents(paths, "caching class latents")

        tok = components.tokenizer
        prompts = {"instance": db.instance_prompt, "class": db.class_prompt or ""}
        self.ids = {k: tok(v, padding="max_length", truncation=True, max_length=tok.model_max_length,
                           return_tensors="pt").input_ids.to(device) for k, v in prompts.items()}
        self.text_trains = db.train_text_encoder or db.lora_text_encoder
        if not self.text_trains:
            with torch.no_grad():
                self.hidden = {k: components.text_encoder(v)[0] for k, v in self.ids.items()}

        unet, te = components.unet, components.text_encoder
        groups = []
        if db.lora:
            with torch.random.fork_rng(devices=[]):  # the adapters' random init is part of the run's seed
                torch.manual_seed(cfg.train.seed)
                unet.add_adapter(_peft_config(db.rank, db.alpha, UNET_LORA_TARGETS))
                if db.lora_text_encoder:
                    te.add_adapter(_peft_config(db.rank, db.alpha, TEXT_LORA_TARGETS))
            groups.append({"params": self._fp32_trainables(unet)})
            if db.lora_text_encoder:
                groups.append({"params": self._fp32_trainables(te), "lr": db.text_encoder_lr or cfg.optim.lr})
        else:
            unet.to(torch.float32).requires_grad_(True)
            groups.append({"params": list(unet.parameters())})
            if db.train_text_encoder:
                te.to(torch.float32).requires_grad_(True)
                groups.append({"params": list(te.parameters()), "lr": db.text_encoder_lr or cfg.optim.lr})
        unet.train()
        te.train(self.text_trains)
        if cfg.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if self.text_trains:
                te.gradient_checkpointing_enable()
        n = sum(p.numel() for g in groups for p in g["params"])
        log.info("dreambooth%s: %d instance image(s)%s, %.1fM trainable parameters", " LoRA" if db.lora else "",
                 self.instance.n, f", {self.prior.n} class image(s)" if self.prior else " (no prior preservation)",
                 n / 1e6)
        return groups

    @staticmethod
    def _fp32_trainables(module: torch.nn.Module) -> list[torch.nn.Parameter]:
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:  # adapters inherit the (maybe half) dtype of the frozen base; masters stay fp32
            p.data = p.data.float()
        return params

    # -- per step --------------------------------------------------------------------------------
    def _hidden(self, kind: str, b: int) -> torch.Tensor:
        if self.text_trains:
            return self.c.text_encoder(self.ids[kind].expand(b, -1))[0]
        return self.hidden[kind].expand(b, -1, -1)

    def loss(self, micro_index: int, generator: torch.Generator) -> torch.Tensor:
        cfg, b = self.cfg, self.cfg.train.batch_size
        idx = batch_indices(micro_index, b, self.instance.n, cfg.data.repeats, cfg.train.seed)
        latents = [self.instance.sample(idx, cfg.data.flip_p, generator)]
        hidden = [self._hidden("instance", b)]
        if self.prior is not None:
            # A stream of its own (seed + 1) so the class images cycle independently of the instances.
            cidx = batch_indices(micro_index, b, self.prior.n, 1, cfg.train.seed + 1)
            latents.append(self.prior.sample(cidx, cfg.data.flip_p, generator))
            hidden.append(self._hidden("class", b))
        per_sample = denoising_loss(self.c, torch.cat(latents).to(self.device), torch.cat(hidden), cfg.train,
                                    generator)
        loss = per_sample[:b].mean()
        if self.prior is not None:
            loss = loss + self.db.prior_loss_weight * per_sample[b:].mean()
        return loss

    # -- state and files -------------------------------------------------------------------------
    def _modules(self) -> dict[str, torch.nn.Module]:
        mods = {"unet": self.c.unet}
        if self.text_trains:
            mods["text_encoder"] = self.c.text_encoder
        return mods

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.db.lora:
            from peft.utils import get_peft_model_state_dict

            return {f"{name}.{k}": v for name, m in self._modules().items()
                    for k, v in get_peft_model_state_dict(m).items()}
        return {f"{name}.{k}": v for name, m in self._modules().items() for k, v in m.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, m in self._modules().items():
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            if self.db.lora:
                from peft.utils import set_peft_model_state_dict

                result = set_peft_model_state_dict(m, part)
                bad = getattr(result, "unexpected_keys", [])
            else:
                result = m.load_state_dict(part, strict=False)
                bad = result.missing_keys + result.unexpected_keys
            if bad or not part:
                raise ConceptorError(f"checkpoint does not match this run's {name} (first mismatch: "
                                     f"{(bad or ['no weights'])[0]}); resume with the same model and flags")

    def save(self, folder: Path, step: int, final: bool) -> list[Path]:
        folder = Path(folder)
        if self.db.lora:
            lora = {}
            for name, m in self._modules().items():
                lora.update(lora_from_peft(m, name))
            name = LORA_FILE if final else LORA_FILE.replace(".safetensors", f"-steps-{step}.safetensors")
            return [write_lora(lora, folder / name, "diffusers")]
        if not final:
            return []  # a full model per snapshot would be GBs; checkpoints/ holds the weights
        return self._save_pipeline(folder)

    def _save_pipeline(self, folder: Path) -> list[Path]:
        """A diffusers pipeline folder in ``folder`` (model_index.json written last, so a half-written
        folder never looks loadable), plus the single-file LDM checkpoint when asked."""
        import json

        from diffusers import StableDiffusionPipeline

        from ..sampling.pipeline import make_scheduler

        c = self.c
        vae, te = c.vae, c.text_encoder
        if vae.dtype != torch.float32 or (not self.text_trains and te.dtype != torch.float32):
            # Frozen parts ran in half precision; write the untouched fp32 originals instead.
            from ..api import resolve_model

            base = resolve_model(self.cfg.model)
            vae = base.vae
            te = te if self.text_trains else base.text_encoder
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=c.tokenizer, unet=c.unet,
                                       scheduler=make_scheduler(c, "ddim"), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        written = []
        with atomic_dir(folder / ".pipeline") as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            # The training scheduler config as shipped (betas, prediction type): samplers start from it.
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(c.scheduler_config), indent=2))
        staged = folder / ".pipeline"
        for part in ("unet", "text_encoder", "vae", "tokenizer", "scheduler"):
            target = folder / part
            if target.exists():
                shutil.rmtree(target)
            os.replace(staged / part, target)
            written.append(target)
        os.replace(staged / "model_index.json", folder / "model_index.json")
        staged.rmdir()
        written.append(folder / "model_index.json")
        if self.db.save_single_file:
            from ..formats.ldm_checkpoint import save_single_file_with_yaml

            written += save_single_file_with_yaml(c.unet, vae, te, folder / "model.safetensors", c.family,
                                                  c.prediction_type, c.scheduler_config)
        return written

    def prompt(self, text: str) -> str:
        return text

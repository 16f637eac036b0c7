"""Generate on the page: A1111's prompt conventions over ``conceptor.load(...).generate``.

An embedding is used when its token appears in the prompt (A1111 loads embeddings the same way), a LoRA
when the prompt holds ``<lora:NAME:WEIGHT>``. The loaded model stays in memory between clicks; it is loaded
again only when the model or the set of LoRAs changes (a LoRA is merged into the weights). Every PNG is
written by ``api.save_images``, so it carries A1111's "parameters" chunk like ``conceptor generate``'s.
"""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConceptorError
from .folders import Folders, list_embeddings, list_loras, list_models

LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^<>]*))?>")
# Every torch call of the page runs on this one thread. Gradio runs handlers on whichever pool thread is
# free, and on the CPU a model loaded on one thread and run from another generated 2.3x slower (4 toy
# images x 30 steps: 2.0 s against 0.85 s, each thread's OpenMP team competing for the cores;
# benchmarks/ui_speed.py). One thread keeps one team.
_TORCH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conceptor-torch")


def on_torch_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run on the page's torch thread; its result (or exception) returned here."""
    return _TORCH.submit(fn, *args, **kwargs).result()


def split_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """``'a <lora:toy:0.8> cat'`` -> ``('a  cat', [('toy', 0.8)])``; the weight defaults to 1, as in A1111."""
    import math

    found = []
    for m in LORA_TAG.finditer(prompt):
        name, weight = m.group(1).strip(), (m.group(2) or "1").strip()
        try:
            w = float(weight)
        except ValueError:
            raise ConceptorError(f"<lora:{name}:{weight}>: the weight must be a number like 0.8") from None
        if not math.isfinite(w):
            raise ConceptorError(f"<lora:{name}:{weight}>: the weight must be a finite number like 0.8")
        found.append((name, w))
    return re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt)).strip(), found


def uses_token(text: str, token: str) -> bool:
    """``token`` stands as its own word in ``text`` (``<cat>`` in 'a <cat>, sitting'; 'cat' not in 'category')."""
    return re.search(rf"(?<![\w]){re.escape(token)}(?![\w])", text or "") is not None


@dataclass
class Request:
    """What the Generate tab sends."""

    model: str
    prompt: str
    negative_prompt: str = ""
    scheduler: str = "ddim"
    steps: int = 30
    guidance: float | None = None
    seed: int = 0
    width: int | None = None
    height: int | None = None
    num_images: int = 1


class Generator:
    """One loaded model at a time, shared by every browser (one generation at a time: the page queues)."""

    def __init__(self, folders: Folders):
        self.folders = folders
        self._key = None
        self._model = None
        self._embedded: dict[str, tuple[Path, int]] = {}  # token -> the file (and its mtime) it was loaded from
        self._lock = threading.Lock()

    def resolve(self, req: Request) -> tuple[str, list[tuple[Path, float]], list[tuple[Path, str | None]], str]:
        """The model path, LoRA files with weights and embedding files this request uses, by the names the
        page listed (never a path from the browser), and the prompt without its LoRA tags."""
        models = list_models(self.folders)
        if req.model not in models:
            raise ConceptorError(f"model {req.model!r} is not in the list; press refresh and pick one")
        prompt, tags = split_loras(req.prompt or "")
        if not prompt:
            raise ConceptorError("write a prompt first")
        loras = list_loras(self.folders)
        missing = [name for name, _ in tags if name not in loras]
        if missing:
            raise ConceptorError(f"no LoRA named {missing[0]!r} in the LoRA folder or the runs; "
                                 f"known: {', '.join(sorted(loras)) or 'none'}")
        embeddings = list_embeddings(self.folders)
        used = [(path, token) for name, (path, token) in embeddings.items()
                if uses_token(prompt, name) or uses_token(req.negative_prompt, name)]
        return models[req.model], [(loras[n], w) for n, w in tags], used, prompt

    def generate(self, req: Request, progress=None) -> tuple[list[Path], str]:
        """The PNG paths written under RUNS/images/<time>/ and the first image's settings text."""
        return on_torch_thread(self._generate, req, progress)

    def _generate(self, req: Request, progress=None) -> tuple[list[Path], str]:
        from .. import api
        from ..sampling.pipeline import check_sampling

        check_sampling(steps=req.steps, guidance=req.guidance, width=req.width, height=req.height, batch_size=4,
                       scheduler=req.scheduler, num_images=req.num_images, seed=req.seed)
        model_path, loras, embeddings, prompt = self.resolve(req)
        wanted = {token or _file_token(path): (path, path.stat().st_mtime_ns) for path, token in embeddings}
        with self._lock:
            model = self._load(model_path, loras)
            if any(self._embedded.get(t, w) != w for t, w in wanted.items()):
                # A token now means another file (a newer run, a replaced file): tokens cannot be taken back
                # out of a tokenizer, so start from a fresh copy of the model.
                self._key = None
                model = self._load(model_path, loras)
            for token, (path, stamp) in wanted.items():
                if token not in model.tokens:
                    model.add_embedding(path, token)
                    self._embedded[token] = (path, stamp)
            guidance = req.guidance if req.guidance is not None else model.default_guidance
            images = model.generate(prompt, negative_prompt=req.negative_prompt or None, num_images=req.num_images,
                                    steps=req.steps, guidance=guidance, scheduler=req.scheduler, seed=req.seed,
                                    width=req.width, height=req.height, progress=progress)
        settings = {"prompt": req.prompt, "negative_prompt": req.negative_prompt or None, "model": model_path,
                    "loras": [f"{p}:{w:g}" for p, w in loras], "embeddings": [str(p) for p, _ in embeddings],
                    "steps": req.steps, "guidance": guidance, "scheduler": req.scheduler, "seed": req.seed,
                    "num_images": req.num_images, "width": req.width, "height": req.height}
        out = self.folders.images / (time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**9:09d}")
        paths = api.save_images(images, out, settings)
        return [p for p in paths if p.name.endswith(".png") and p.name != "grid.png"], \
            api.generation_text(settings, 0, images[0].size)

    def _load(self, model_path: str, loras: list[tuple[Path, float]]):
        from .. import api

        key = (model_path, tuple((str(p), w, p.stat().st_mtime_ns) for p, w in sorted(loras)))
        if self._key != key:
            self._model, self._key, self._embedded = None, None, {}  # free the old weights before loading new ones
            self._model = api.load(model_path, loras=[f"{p}:{w}" for p, w in loras])
            self._key = key
        return self._model


def _file_token(path: Path) -> str:
    from ..formats.embeddings import read_embedding

    return read_embedding(path).token

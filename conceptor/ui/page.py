"""What the page's buttons do, as plain functions over the folders, the generator and the job queue.

Every handler turns a ``ConceptorError`` (or an OSError) into one ``error: ...`` line in the tab's status box;
the page never shows a traceback. Names shown in lists map back to paths the server found itself.
"""
from __future__ import annotations

import html
import logging
from pathlib import Path

from ..errors import ConceptorError
from . import folders as F
from .generation import Generator, Request, on_torch_thread
from .jobs import ACTIVE, Queue, format_eta, progress
from .training import TrainForm, check_uploads, copy_uploads, form_config

log = logging.getLogger("conceptor")
CONVERT_TARGETS = {"embedding": ("diffusers", "a1111", "kohya"), "lora": ("diffusers", "kohya"),
                   "model": ("a1111",)}


def _error(e: BaseException) -> str:
    if isinstance(e, OSError):
        return f"error: {e.strerror or e}" + (f" ({e.filename})" if getattr(e, "filename", None) else "")
    return f"error: {e}"


class Page:
    QUEUE_HEADERS = ("#", "job", "method", "status", "progress", "ETA")

    def __init__(self, folders: F.Folders, queue: Queue):
        self.folders = folders
        self.queue = queue
        self.generator = Generator(folders)

    # -- lists -----------------------------------------------------------------------------------

    def model_choices(self) -> list[str]:
        return list(F.list_models(self.folders))

    def token_samples(self) -> list[list[str]]:
        return [[t] for t in F.list_embeddings(self.folders)]

    def lora_samples(self) -> list[list[str]]:
        return [[f"<lora:{n}:1>"] for n in F.list_loras(self.folders)]

    def run_choices(self) -> list[str]:
        return list(F.list_runs(self.folders))

    def job_choices(self) -> list[str]:
        return [j.id for j in reversed(self.queue.jobs())]  # newest first: the one just started

    @staticmethod
    def insert(sample, prompt: str) -> str:
        """A chip's text added to the end of the prompt (A1111 inserts at the end too)."""
        text = sample[0] if isinstance(sample, (list, tuple)) else str(sample)
        prompt = (prompt or "").rstrip()
        return f"{prompt}{', ' if prompt and not prompt.endswith(',') else ' ' if prompt else ''}{text}"

    # -- generate --------------------------------------------------------------------------------

    def generate(self, model, prompt, negative, sampler, steps, guidance, seed, width, height, count):
        try:
            req = Request(model=model or "", prompt=prompt or "", negative_prompt=negative or "",
                          scheduler=sampler or "ddim", steps=_or(_int(steps, "steps"), 30),
                          guidance=_num(guidance, "guidance"), seed=_int(seed, "seed"), width=_int(width, "width"),
                          height=_int(height, "height"), num_images=_or(_int(count, "images"), 1))
            paths, info = self.generator.generate(req)
        except (ConceptorError, OSError) as e:
            return [], _error(e)
        return [(str(p), p.name) for p in paths], info

    # -- train -----------------------------------------------------------------------------------

    def start(self, method, model, folder, uploads, token, init_word, instance, class_prompt, steps, lr,
              resolution, lora, rank, vectors, batch, validation, validation_every, checkpoint_every, seed,
              precision, name, adapter="lora"):
        import gradio as gr

        try:
            form = TrainForm(method=method, model=model or "", folder=folder or "", token=token or "",
                             init_word=init_word or "", instance_prompt=instance or "", class_prompt=class_prompt or "",
                             steps=_int(steps, "steps") or 0, lr=_num(lr, "learning rate"), resolution=_int(resolution),
                             lora=bool(lora), rank=_int(rank, "LoRA rank") or 4, vectors=_int(vectors) or 1,
                             batch_size=_int(batch), validation_prompt=validation or "",
                             validation_every=_int(validation_every), checkpoint_every=_int(checkpoint_every),
                             seed=_int(seed, "seed") or 0, mixed_precision=precision or "no", name=name or "",
                             adapter=adapter or "lora")
            job = self.submit(form, _upload_paths(uploads))
        except (ConceptorError, OSError) as e:
            return _error(e), gr.Dropdown(), gr.File()
        ahead = sum(1 for j in self.queue.jobs() if j.status in ACTIVE and j.id != job.id)
        where = f"queued behind {ahead} job(s)" if ahead >= len(self.queue.devices) else "starting"
        return f"job {job.id}: {where}", gr.Dropdown(choices=self.job_choices(), value=job.id), None

    def submit(self, form: TrainForm, uploads: list[str]):
        """Check the uploads and the form, then queue the job (its folder holds the uploads)."""
        checked = check_uploads(uploads) if uploads else []
        if checked and form.folder.strip():
            raise ConceptorError("give either uploads or a folder, not both")
        # The form is checked now, before a job folder exists; the uploads' real folder is only known inside
        # the new job's folder, so prepare() puts it in the config before the queue checks the whole run.
        config = form_config(form, self.folders, Path("/uploads-placeholder") if checked else None)

        def prepare(job_folder: Path):
            if checked:
                copy_uploads(checked, job_folder / "images")
                section = "finetune" if form.method == "finetune" else "data"
                key = "dataset" if form.method == "finetune" else "images"
                config[section][key] = str(job_folder / "images")

        job = self.queue.submit(form.method, config, form.name, prepare=prepare)
        self.queue.tick()  # start it now if its device is free
        return job

    def cancel(self, job_id) -> str:
        if not job_id:
            return "error: pick a job to cancel"
        try:
            job = self.queue.cancel(job_id)
        except ConceptorError as e:
            return _error(e)
        return f"job {job.id}: {'cancelled' if job.status == 'cancelled' else 'stopping (checkpoints are kept)'}"

    def queue_html(self) -> str:
        """The jobs in queue order as a table (status and step in data attributes for scripts and tests)."""
        rows = []
        for i, job in enumerate(self.queue.jobs()):
            p = progress(job)
            steps = f"{p['step']}/{p['steps']}" if p["steps"] else "-"
            cells = (i + 1, job.id, job.state.get("method"), job.status, steps, format_eta(p["eta_s"]))
            rows.append(f'<tr data-job="{html.escape(job.id)}" data-status="{html.escape(job.status)}">' +
                        "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        head = "".join(f"<th>{h}</th>" for h in self.QUEUE_HEADERS)
        body = "".join(rows) or '<tr><td colspan="6">no jobs yet</td></tr>'
        return f"<p>queue: one job per device, the rest wait in this order</p><table><tr>{head}</tr>{body}</table>"

    def job_view(self, job_id: str | None) -> dict:
        empty = {"html": "", "loss": None, "grids": [], "log": ""}
        if not job_id:
            return empty
        try:
            job = self.queue.get(job_id)
        except ConceptorError as e:
            return {**empty, "html": html.escape(_error(e))}
        p = progress(job)
        pct = round(100 * p["fraction"])
        status = job.status + (f": {job.state['error']}" if job.state.get("error") and job.status != "done" else "")
        bar = (f'<div class="bar" data-fraction="{p["fraction"]:.3f}"><div style="width:{pct}%"></div></div>'
               f'<p id="job-status" data-status="{html.escape(job.status)}">{html.escape(job.id)}: '
               f'{html.escape(status)} - step {p["step"]}/{p["steps"] or "?"} ({pct}%), ETA {format_eta(p["eta_s"])}'
               "</p>")
        grids = [(str(s), s.stem) for s in p["samples"]]
        return {"html": bar, "loss": _loss_curve(job, p["rows"]), "grids": grids, "log": p["log"]}

    # -- runs ------------------------------------------------------------------------------------

    def _run(self, label: str) -> Path:
        runs = F.list_runs(self.folders)
        if label not in runs:
            raise ConceptorError(f"no run {label!r}; press refresh")
        return runs[label]

    def run_view(self, label: str | None) -> dict:
        view = {"summary": "", "config": "", "files": [], "convertible": [], "message": ""}
        if not label:
            return view
        try:
            run = self._run(label)
            from ..training.metrics import read_metrics

            rows = read_metrics(run / "metrics.jsonl")
            config = (run / "config.yaml").read_text()
            files = _run_files(run)
        except (ConceptorError, OSError) as e:
            return {**view, "message": _error(e)}
        last = rows[-1] if rows else {}
        eval_line = ""
        if (run / "eval.json").is_file():
            eval_line = f"; conceptor eval: {(run / 'eval.json').read_text()[:400]}"
        summary = (f"{label}: {last.get('step', 0)} steps logged, last loss {last.get('loss', float('nan')):.4f}, "
                   f"{len(files)} file(s){eval_line}" if rows else f"{label}: no steps logged yet")
        return {"summary": summary, "config": config, "files": [str(f) for f in files],
                "convertible": [f"{kind}: {p.relative_to(run)}" for kind, p in _convertible(run)], "message": ""}

    def evaluate(self, label):
        import json

        from ..eval.run import evaluate_run

        try:
            scores = on_torch_thread(evaluate_run, self._run(label or ""), n=8, steps=20)
        except (ConceptorError, OSError) as e:
            return "", _error(e)
        text = "\n".join(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in scores.items())
        return text, "evaluated; eval.json and eval-*.png written in the run folder"

    def convert(self, label, choice, to):
        from .. import api

        try:
            run = self._run(label or "")
            found = {f"{kind}: {p.relative_to(run)}": (kind, p) for kind, p in _convertible(run)}
            if choice not in found:
                raise ConceptorError("pick a file of this run to convert")
            kind, src = found[choice]
            if to not in CONVERT_TARGETS[kind]:
                raise ConceptorError(f"a {kind} converts to {' or '.join(CONVERT_TARGETS[kind])}, not {to}")
            dst = run / "converted" / f"{src.stem if kind != 'model' else run.name}-{to}" \
                f"{'.pt' if kind == 'embedding' and to == 'a1111' else '.safetensors'}"
            dst.parent.mkdir(exist_ok=True)
            if kind == "embedding":
                api.convert_embedding(src, dst, to=to)
            elif kind == "lora":
                api.convert_lora(src, dst, to=to)
            else:
                on_torch_thread(_model_to_single_file, src, dst)
        except (ConceptorError, OSError) as e:
            return None, _error(e)
        return str(dst), f"wrote {dst.relative_to(run)}"


def _loss_curve(job, rows: list[dict]) -> str | None:
    """The job's loss curve as a PNG (training/metrics.plot_loss, as loss.png is drawn), redrawn only when
    new rows arrived; None before the second row."""
    from ..training.metrics import plot_loss

    if len([r for r in rows if "loss" in r]) < 2:
        return None
    path = job.folder / f".loss-{len(rows)}.png"
    if not path.is_file():
        for old in job.folder.glob(".loss-*.png"):
            old.unlink(missing_ok=True)
        plot_loss(rows, path)
    return str(path)


def _run_files(run: Path) -> list[Path]:
    """What a user downloads from a run: its outputs, grids, curve, config and scores, not checkpoints."""
    keep = (".safetensors", ".pt", ".json", ".yaml", ".png", ".jsonl")
    files = [p for p in sorted(run.iterdir()) if p.is_file() and p.suffix in keep and not p.name.startswith(".")]
    for sub in ("samples", "converted"):
        if (run / sub).is_dir():
            files += sorted(p for p in (run / sub).iterdir() if p.is_file() and not p.name.startswith("."))
    return files


def _convertible(run: Path) -> list[tuple[str, Path]]:
    found = []
    if (run / "learned_embeds.safetensors").is_file():
        found.append(("embedding", run / "learned_embeds.safetensors"))
    if (run / "pytorch_lora_weights.safetensors").is_file():
        found.append(("lora", run / "pytorch_lora_weights.safetensors"))
    if (run / "model_index.json").is_file():
        found.append(("model", run))
    return found


def _model_to_single_file(folder: Path, dst: Path) -> None:
    """A DreamBooth / fine-tune output folder as one A1111/ComfyUI checkpoint (+ its .yaml for SD 1/2)."""
    from ..config import ModelConfig
    from ..formats.ldm_checkpoint import save_single_file_with_yaml
    from ..models.load import resolve_model

    c = resolve_model(ModelConfig(model=str(folder)))
    if c.flow is not None:
        raise ConceptorError(f"{folder.name} is an {c.flow.title} model; the single-file checkpoint layout here is "
                             "SD 1/2/XL's: use the diffusers folder itself")
    save_single_file_with_yaml(c.unet, c.vae, c.text_encoder, dst, c.family, c.prediction_type, c.scheduler_config,
                               text_encoder_2=c.text_encoder_2)


def _upload_paths(uploads) -> list[str]:
    if not uploads:
        return []
    items = uploads if isinstance(uploads, list) else [uploads]
    return [str(getattr(u, "name", u)) for u in items]


def _num(value, what: str = "value") -> float | None:
    """A number box's value; empty or 0 means "the default" (Gradio shows an empty number box as 0)."""
    import math

    if value is None or value == "":
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConceptorError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(f):
        raise ConceptorError(f"{what} must be a finite number, got {value}")
    return None if f == 0 else f


def _or(value, default):
    """An empty box's default (a 0 typed in it stays 0, to be refused where 0 is wrong)."""
    return default if value is None else value


def _int(value, what: str = "value") -> int | None:
    """A whole number; 0 means "the default", except for the seed, steps and image count, where it is 0."""
    f = _num(value, what)
    if f is None:
        return 0 if what in ("seed", "steps", "images") and value not in (None, "") else None
    if f != int(f):
        raise ConceptorError(f"{what} must be a whole number, got {value}")
    return int(f)

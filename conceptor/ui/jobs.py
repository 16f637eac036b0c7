"""The page's training queue: jobs are folders and separate processes, so they outlive the page.

``RUNS/<job>/job.json`` says what to run and where it stands; ``config.yaml`` is the run's config; the
training run writes ``RUNS/<job>/output`` (metrics.jsonl, samples/, checkpoints/) as any CLI run does. The
worker (``python -m conceptor.ui.worker JOB``) runs ``conceptor train`` in its own session (a restart of the
page does not stop it) and leaves ``result.json`` when it ends. A page that starts again reads the folders:
a job whose worker is alive is still running, one whose worker died without a result is queued again and
resumes from its last checkpoint, a queued one keeps its place. One job runs per device; the rest wait in
the order they were queued. Only the page writes job.json (under ``RUNS/.queue.lock``, so two pages on one
folder never start a job twice); the worker writes only result.json.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from ..errors import ConceptorError
from ..fileio import write_text

log = logging.getLogger("conceptor")

JOB_FILE, RESULT_FILE, LOG_FILE, CONFIG_FILE = "job.json", "result.json", "job.log", "config.yaml"
OUTPUT = "output"
MAX_ATTEMPTS = 3  # a job whose worker dies without a result this often is failed, not started again
KILL_AFTER_S = 20.0  # a cancelled worker that has not stopped after SIGINT this long is killed
ACTIVE = ("queued", "running")


@dataclass
class Job:
    folder: Path
    state: dict

    @property
    def id(self) -> str:
        return self.folder.name

    @property
    def status(self) -> str:
        return self.state["status"]

    @property
    def output(self) -> Path:
        return self.folder / OUTPUT


def devices() -> list[str]:
    """The devices jobs run on, one job each: every visible GPU, else the CPU."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def _alive(pid: int | None, folder: Path) -> bool:
    """The worker of ``folder`` is running: the pid lives and its command line names this job (a pid reused
    by another program after a reboot does not count)."""
    from ..training.lock import pid_alive

    if not pid or not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): trust the pid
    if any(part.endswith(b"<defunct>") for part in cmdline) or not cmdline or cmdline == [b""]:
        return False  # a zombie: it has ended, only not yet been reaped
    return str(folder).encode() in cmdline


class Queue:
    """Jobs under ``runs``; ``tick()`` (called every second by the page) starts what may start."""

    def __init__(self, runs: Path, device_list: list[str] | None = None, python: str = sys.executable):
        self.runs = Path(runs)
        self.runs.mkdir(parents=True, exist_ok=True)
        self.devices = device_list or devices()
        self.python = python
        self._children: dict[int, subprocess.Popen] = {}  # workers this page started (reaped here)

    # -- reading -------------------------------------------------------------------------------------

    def jobs(self) -> list[Job]:
        """Every job, in queue order (the order they were submitted)."""
        found = []
        for folder in self.runs.iterdir() if self.runs.is_dir() else ():
            state = _read_json(folder / JOB_FILE) if folder.is_dir() and not folder.is_symlink() else None
            if state and isinstance(state.get("created"), (int, float)) and state.get("status"):
                found.append(Job(folder, state))
        return sorted(found, key=lambda j: (j.state["created"], j.id))

    def get(self, job_id: str) -> Job:
        for job in self.jobs():
            if job.id == job_id:
                return job
        raise ConceptorError(f"no job {job_id!r} in {self.runs}")

    # -- changing ------------------------------------------------------------------------------------

    def submit(self, method: str, config: dict, name: str | None = None, prepare=None) -> Job:
        """A new queued job running ``conceptor train METHOD`` on ``config`` (its output is set here).
        ``prepare(folder)`` fills the job folder (uploads) before the job can start; if it fails, nothing
        is left behind."""
        from ..config import build_config

        job_id = _job_id(method, name)
        folder = self.runs / job_id
        folder.mkdir(parents=True, exist_ok=False)
        try:
            if prepare is not None:
                prepare(folder)
            config = {**config, "train": {**config.get("train", {}), "output": str(folder / OUTPUT)}}
            build_config(method, config, {})  # a setting that cannot run is refused now, not in the queue
            write_text(folder / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
            with self._locked():
                self._write(Job(folder, {"method": method, "status": "queued", "created": time.time(),
                                         "resume": False, "attempts": 0}))
        except BaseException:
            _remove_job_folder(folder)
            raise
        return Job(folder, _read_json(folder / JOB_FILE))

    def cancel(self, job_id: str) -> Job:
        """A queued job never starts; a running one is interrupted (SIGINT: its checkpoints stay)."""
        with self._locked():
            job = self.get(job_id)
            if job.status == "queued":
                job.state.update(status="cancelled", ended=time.time())
            elif job.status == "running":
                job.state.update(cancel=True, cancel_at=time.time())
                _signal(job.state.get("pid"), signal.SIGINT)
            else:
                raise ConceptorError(f"job {job_id} has already ended ({job.status})")
            self._write(job)
        return job

    def tick(self) -> list[Job]:
        """Bring every job's status up to date, then start queued jobs on free devices; returns the jobs."""
        with self._locked():
            self._reap()
            jobs = self.jobs()
            for job in jobs:
                self._refresh(job)
            busy = {j.state.get("device") for j in jobs if j.status == "running"}
            for job in (j for j in jobs if j.status == "queued"):
                free = [d for d in self.devices if d not in busy]
                if not free:
                    break
                self._start(job, free[0])
                busy.add(free[0])
        return jobs

    def _refresh(self, job: Job) -> None:
        if job.status != "running":
            return
        result = _read_json(job.folder / RESULT_FILE)
        pid = job.state.get("pid")
        if result is not None and result.get("attempt") == job.state.get("attempts"):
            rc = result.get("rc")
            status = "done" if rc == 0 else "cancelled" if job.state.get("cancel") else "failed"
            job.state.update(status=status, ended=result.get("ended", time.time()), rc=rc,
                             error=result.get("error"))
        elif _alive(pid, job.folder):
            if job.state.get("cancel") and time.time() - job.state.get("cancel_at", 0) > KILL_AFTER_S:
                _signal(pid, signal.SIGKILL)
            return
        elif job.state.get("cancel"):
            job.state.update(status="cancelled", ended=time.time())
        elif job.state.get("attempts", 0) >= MAX_ATTEMPTS:  # it dies every time (OOM killer?): stop trying
            job.state.update(status="failed", ended=time.time(), pid=None,
                             error=f"the training process died {MAX_ATTEMPTS} times without a word (out of memory?); "
                                   f"see {LOG_FILE}")
        else:  # the worker died without a word (killed, machine restarted): go again from the last checkpoint
            log.warning("job %s stopped without finishing; queued again to resume from its last checkpoint", job.id)
            job.state.update(status="queued", resume=True, pid=None)
        self._write(job)

    def _start(self, job: Job, device: str) -> None:
        attempt = job.state.get("attempts", 0) + 1
        job.state.update(status="running", device=device, attempts=attempt, started=time.time())
        env = dict(os.environ)
        if device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        with open(job.folder / LOG_FILE, "ab") as log_file:
            # Its own session: Ctrl-C on the page (or the page's end) does not reach the training run.
            proc = subprocess.Popen([self.python, "-m", "conceptor.ui.worker", str(job.folder), str(attempt)],
                                    stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        self._children[proc.pid] = proc
        job.state["pid"] = proc.pid
        self._write(job)

    def _reap(self) -> None:
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]

    def _write(self, job: Job) -> None:
        write_text(job.folder / JOB_FILE, json.dumps(job.state, indent=1))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.runs / ".queue.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# -- what the page shows of a job --------------------------------------------------------------------

def progress(job: Job) -> dict:
    """Step, total, fraction, ETA (from the steps logged since the run last started), loss rows, the
    validation grids written so far and the last line of the log."""
    from ..training.metrics import read_metrics

    rows = read_metrics(job.output / "metrics.jsonl")
    total = _steps(job)
    step = rows[-1]["step"] if rows else 0
    eta = None
    if job.status == "running" and rows and total:
        segment = _current_segment(rows)
        first, last = segment[0], segment[-1]
        if len(segment) > 1 and last["elapsed_s"] > first["elapsed_s"]:
            rate = (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])
        else:
            rate = last["step"] / last["elapsed_s"] if last.get("elapsed_s") else 0
        eta = (total - step) / rate if rate > 0 else None
    if job.status == "done":
        step = total or step
    samples = sorted((job.output / "samples").glob("step-*.png")) if (job.output / "samples").is_dir() else []
    return {"step": step, "steps": total, "fraction": min(1.0, step / total) if total else 0.0, "eta_s": eta,
            "rows": rows, "samples": samples, "log": last_log_line(job.folder / LOG_FILE)}


def _current_segment(rows: list[dict]) -> list[dict]:
    """The rows since the run last (re)started: elapsed_s starts again from zero on resume."""
    start = 0
    for i in range(1, len(rows)):
        if rows[i].get("elapsed_s", 0) < rows[i - 1].get("elapsed_s", 0):
            start = i
    return [r for r in rows[start:] if "elapsed_s" in r]


def _steps(job: Job) -> int | None:
    """The run's step count: the one its output's config says (epochs resolved), else the job's config."""
    for path in (job.output / CONFIG_FILE, job.folder / CONFIG_FILE):
        try:
            steps = (yaml.safe_load(path.read_text()) or {}).get("train", {}).get("steps")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(steps, int):
            return steps
    return None


def last_log_line(path: Path, tail: int = 4096) -> str:
    """The newest line of a log that progress bars redraw with carriage returns."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - tail))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in re.split(r"[\r\n]", text) if ln.strip()]
    return lines[-1] if lines else ""


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


# -- helpers -----------------------------------------------------------------------------------------

def _job_id(method: str, name: str | None) -> str:
    short = {"textual-inversion": "ti", "dreambooth": "db", "finetune": "ft"}.get(method, method)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", (name or "").strip()).strip("-.")[:40]
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{short}{'-' + slug if slug else ''}-{secrets.token_hex(2)}"


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _signal(pid: int | None, sig: int) -> None:
    """Signal the worker's whole session (it and anything it started)."""
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _remove_job_folder(folder: Path) -> None:
    """Undo a submit that failed: the folder was made a moment ago by this call and holds only its files."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)

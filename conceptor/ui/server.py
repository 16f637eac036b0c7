"""Start the page: bind (127.0.0.1 unless told otherwise, and then only with a password), run the queue's
clock, serve. Training jobs are separate processes, so stopping the page leaves them running."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from ..errors import ConceptorError
from .folders import Folders

log = logging.getLogger("conceptor")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def read_auth(auth: str | None, auth_file: str | None) -> list[tuple[str, str]]:
    """``user:password`` pairs from ``--auth`` and ``--auth-file`` (one pair per line, # comments)."""
    lines = [auth] if auth else []
    if auth_file:
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConceptorError(f"cannot read --auth-file {auth_file}: {getattr(e, 'strerror', None) or e}") from None
        lines += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    pairs = []
    for line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ConceptorError("--auth takes user:password (both non-empty); an --auth-file has one such line "
                                 "per user")
        pairs.append((user, password))
    return pairs


def check_bind(host: str, auth: list[tuple[str, str]]) -> None:
    if host not in LOCAL_HOSTS and not auth:
        raise ConceptorError(f"--host {host} lets other machines reach the page; give --auth user:password (or "
                             "--auth-file FILE) too, or leave --host at 127.0.0.1")


class Clock(threading.Thread):
    """Calls ``queue.tick()`` every second, so queued jobs start while no browser is open."""

    def __init__(self, queue, every: float = 1.0):
        super().__init__(daemon=True, name="conceptor-queue")
        self.queue, self.every, self.stopped = queue, every, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                self.queue.tick()
            except Exception as e:  # a damaged job folder must not stop the queue: say so and go on
                log.warning("queue: %s", e)


def serve(folders: Folders, host: str = "127.0.0.1", port: int | None = 7860, auth: list | None = None,
          block: bool = True, devices: list[str] | None = None):
    """Build the page and serve it; returns (demo, url, clock) when ``block`` is False (tests)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page never calls home
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests, one line each
    check_bind(host, auth or [])
    from .app import build
    from .jobs import Queue
    from .page import Page

    queue = Queue(folders.runs, devices)
    queue.tick()  # pick up jobs a previous page left: running ones are watched, dead ones resume
    demo, css = build(Page(folders, queue))
    clock = Clock(queue)
    clock.start()
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=host, server_port=port, auth=auth or None, prevent_thread_lock=True, quiet=True,
            allowed_paths=[str(folders.runs)], max_file_size="50mb", css=css, footer_links=[],
            show_error=False)
    except OSError as e:
        clock.stopped.set()
        why = "the port is in use" if "empty port" in str(e) else (e.strerror or str(e))  # gradio's words name its API
        raise ConceptorError(f"cannot listen on {host}:{port}: {why}; pass another --port") from None
    url = f"http://{'[' + host + ']' if ':' in host else host}:{demo.server_port}/"
    if not block:
        return demo, url, clock
    print(f"conceptor ui: {url}  (Ctrl-C stops the page; training jobs keep running)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("conceptor ui stopped; training jobs go on (start the page again to follow them)", flush=True)
    finally:
        clock.stopped.set()
        demo.close()

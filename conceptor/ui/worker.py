"""One queued job: ``python -m conceptor.ui.worker JOB ATTEMPT`` runs ``conceptor train`` on the job's
config (resuming when the queue says so) and leaves ``result.json``: the exit code and the error line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from ..fileio import write_text
    from .jobs import CONFIG_FILE, JOB_FILE, LOG_FILE, RESULT_FILE

    folder, attempt = Path(argv[0]), int(argv[1])
    job = json.loads((folder / JOB_FILE).read_text())
    args = ["train", job["method"], "--config", str(folder / CONFIG_FILE)]
    if job.get("resume"):
        args += ["--resume", "latest"]
    print(f"conceptor {' '.join(args)}", flush=True)
    try:
        from ..cli import main as cli_main  # torch and diffusers load here: a cancel may arrive meanwhile

        rc = cli_main(args)
    except KeyboardInterrupt:  # cancelled before training began (the CLI reports later interrupts itself)
        print("interrupted before training started", file=sys.stderr)
        rc = 130
    sys.stdout.flush()
    sys.stderr.flush()
    error = None
    if rc != 0:
        lines = (folder / LOG_FILE).read_text(errors="replace").splitlines()
        error = next((ln for ln in reversed(lines) if ln.startswith(("error:", "interrupted"))), f"exit code {rc}")
    write_text(folder / RESULT_FILE, json.dumps({"rc": rc, "error": error, "ended": time.time(), "attempt": attempt}))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

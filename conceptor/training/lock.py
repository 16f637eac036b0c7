"""One run per output folder: ``OUTPUT/.conceptor.lock`` holds the owner's pid and host.

A second run on the same folder is refused while the owner lives; a lock whose process is gone (a
killed run) is stale and taken over with a note, so ``--resume latest`` after a crash just works.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

from ..errors import ConceptorError

log = logging.getLogger("conceptor")
LOCK_NAME = ".conceptor.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    path = Path(folder) / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: exactly one creator wins
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (OSError, ValueError):
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            if host == me["host"] and isinstance(pid, int) and pid != me["pid"] and _alive(pid):
                raise ConceptorError(f"{folder} is in use by another conceptor run (pid {pid}); wait for it or "
                                     "choose another --output") from None
            if host not in (None, me["host"]):
                raise ConceptorError(f"{folder} is locked by a run on {host} (pid {pid}); if that run is gone, "
                                     f"delete {path}") from None
            log.warning("taking over a stale lock in %s (pid %s is gone)", folder, pid)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)

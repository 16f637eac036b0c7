"""One run per output folder: ``OUTPUT/.conceptor.lock``, held with an exclusive ``flock`` for the run's life.

The kernel holds the lock, not the file's contents: it is taken in one atomic step, and released when the
process ends however it ends, so a killed run never leaves a lock behind and two runs started at the same
moment cannot both win (an O_EXCL file filled in after creation could be read empty, i.e. stale). The
file carries the owner's pid and host, written while the flock is held, so it is never read half-written:
a live pid in it (a holder that could not flock, e.g. an older conceptor) is still respected, and a dead
one is a stale lock, taken over with a note.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

from ..errors import ConceptorError

LOCK_NAME = ".conceptor.lock"


log = logging.getLogger("conceptor")


def _owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(owner: dict) -> str:
    return f" (pid {owner['pid']})" if "pid" in owner else ""


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    path = Path(folder) / LOCK_NAME
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ConceptorError(f"{path} is not a lock file conceptor wrote; remove it or choose another --output")
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConceptorError(f"{folder} is in use by another conceptor run{_describe(_owner(path))}; wait "
                                 "for it or choose another --output") from None
        # The previous holder unlinks the file as it finishes: a lock on that old inode guards nothing.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    owner = _owner(path)
    pid, host = owner.get("pid"), owner.get("host")
    if isinstance(pid, int) and pid != me["pid"]:
        refusal = None
        if host == me["host"] and pid_alive(pid):
            refusal = f"{folder} is in use by another conceptor run (pid {pid}); wait for it or choose another " \
                      "--output"
        elif host not in (None, me["host"]):
            refusal = f"{folder} is locked by a run on {host} (pid {pid}); if that run is gone, delete {path}"
        if refusal:
            os.close(fd)
            raise ConceptorError(refusal)
        log.warning("taking over a stale lock in %s (pid %s is gone)", folder, pid)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(me).encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)  # releases the flock

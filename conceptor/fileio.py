"""Atomic file writes: a crash never leaves a half-written file under the real name.

conceptor only ever creates regular files and folders: a target that exists as a link, a device node, a
FIFO or a folder (for a file) is refused, never replaced or written through. A full disk is reported as
``OSError(ENOSPC)`` whichever writer hit it (safetensors and torch.save raise their own types).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ConceptorError

_KINDS = {stat.S_ISLNK: "a link", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a folder",
          stat.S_ISREG: "a file"}


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS.items() if test(mode)), "not a regular file")


def check_target(path: Path, want_dir: bool = False) -> None:
    """Refuse to replace anything conceptor would not have written there: links, devices, FIFOs, sockets,
    and a folder where a file goes (or a file where a folder goes)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if (stat.S_ISDIR(mode) if want_dir else stat.S_ISREG(mode)):
        return
    raise ConceptorError(f"{path} exists and is {_kind(mode)}; conceptor only replaces regular "
                         f"{'folders' if want_dir else 'files'} it wrote: choose another path")


def _disk_full(e: BaseException, folder: Path) -> bool:
    """safetensors says 'os error 28' in a SafetensorError; torch.save's zip writer only says 'unexpected
    pos' in a RuntimeError, so a writer failure on a filesystem with no space left counts as a full disk."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e)
    if "No space left" in text or "os error 28" in text:
        return True
    try:
        return isinstance(e, RuntimeError) and shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def _raise_disk_full(e: BaseException, path: Path) -> None:
    if not isinstance(e, ConceptorError) and _disk_full(e, path.parent):
        raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None


TEMP_SUFFIX = ".tmp"


def is_temp_of(name: str, target: str) -> bool:
    """``name`` is the temp file ``atomic_path`` writes for ``target`` (left behind only by a kill)."""
    return name.startswith(f".{target}.") and name.endswith(TEMP_SUFFIX)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.

    Writers that take a filename (safetensors, PIL, torch.save) write to the yielded path. The temp file
    lives in the same folder so the final ``os.replace`` is a rename on one filesystem, hence atomic.
    """
    path = Path(path)
    check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except Exception as e:  # measured while the partial temp file still fills the disk
            _raise_disk_full(e, path)
            raise
        check_target(path)  # the writer may have taken long: still nothing foreign under that name
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success replace ``path`` with it (old contents removed after).

    Used for checkpoint folders and pipeline folders, which are several files that must appear together.
    """
    path = Path(path)
    check_target(path, want_dir=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        try:
            yield tmp
        except Exception as e:
            _raise_disk_full(e, path)
            raise
        old = None
        check_target(path, want_dir=True)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.is_symlink() or old.is_file():
                old.unlink()
            elif old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

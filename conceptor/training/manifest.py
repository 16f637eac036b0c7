"""What conceptor wrote in a run folder: ``OUTPUT/.conceptor-run.json`` lists every file, relative to the folder.

``--overwrite`` removes exactly those files (and folders they leave empty), nothing a user put beside
them, and never through a link: a link where conceptor wrote a file means someone else put it there, so
the whole removal is refused before anything is deleted. A folder with a manifest is a conceptor run,
which is what ``--resume`` and ``--overwrite`` require.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import ConceptorError
from ..fileio import write_text

MANIFEST = ".conceptor-run.json"


class Manifest:
    def __init__(self, folder: Path, files: set[str] | None = None):
        self.folder = Path(folder)
        self.files: set[str] = set(files or ())

    @classmethod
    def read(cls, folder: Path) -> "Manifest | None":
        """The folder's manifest; None when there is none. A damaged one is an error: it cannot be trusted
        to say what may be deleted."""
        path = Path(folder) / MANIFEST
        if not path.is_file() or path.is_symlink():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            files = data["files"]
            if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
                raise TypeError("files is not a list of names")
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConceptorError(f"{path} is damaged ({type(e).__name__}); conceptor cannot tell which files "
                                 "in that folder are its own: choose another --output") from None
        return cls(folder, {f for f in files if _safe_relative(f)})

    def add(self, *paths: Path | None) -> None:
        """Record files (a folder: every file under it, links not followed) and save the manifest."""
        for p in paths:
            if p is None:
                continue
            p = Path(p)
            if p.is_symlink():
                continue
            if p.is_dir():
                for root, _, names in os.walk(p):
                    self.files.update(self._relative(Path(root) / n) for n in names)
            elif p.is_file():
                self.files.add(self._relative(p))
        self.files.discard(None)
        self.save()

    def _relative(self, p: Path) -> str | None:
        try:
            return Path(os.path.abspath(p)).relative_to(os.path.abspath(self.folder)).as_posix()
        except ValueError:  # outside the run folder (e.g. a user's --class-images): not ours to list
            return None

    def save(self) -> None:
        write_text(self.folder / MANIFEST, json.dumps({"format": 1, "files": sorted(self.files)}, indent=0))

    def remove_all(self) -> int:
        """Delete every listed file that is still a regular file, then the folders they leave empty.
        Everything is checked first, so a refusal deletes nothing. Returns how many files went."""
        doomed = []
        for rel in sorted(self.files):
            path = self.folder / rel
            for part in [*reversed(path.relative_to(self.folder).parents[:-1]), Path(rel)]:
                target = self.folder / part
                try:
                    mode = os.lstat(target).st_mode
                except FileNotFoundError:
                    break
                if stat.S_ISLNK(mode):
                    raise ConceptorError(f"--overwrite: {target} is a link, which conceptor never writes; remove "
                                         "it yourself or choose another --output (nothing was deleted)")
                if part == Path(rel) and not stat.S_ISREG(mode):
                    raise ConceptorError(f"--overwrite: {target} is no longer the file conceptor wrote; remove it "
                                         "yourself or choose another --output (nothing was deleted)")
            else:
                doomed.append(path)
        for path in doomed:
            path.unlink()
        for folder in sorted({p.parent for p in doomed}, key=lambda p: -len(p.parts)):
            while folder != self.folder and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent
        self.files.clear()
        (self.folder / MANIFEST).unlink(missing_ok=True)
        return len(doomed)


def _safe_relative(rel: str) -> bool:
    """A name inside the folder: no absolute paths or '..' from a tampered manifest."""
    p = Path(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts

"""Read tensors from files without ever running code: safetensors first, pickles only with weights_only."""
from __future__ import annotations

import io
import os
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

from ..errors import ConceptorError

SAFETENSORS = {".safetensors"}
PICKLES = {".pt", ".pth", ".bin", ".ckpt"}
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's legacy (pre-zip) format
_SCAN_BYTES = 64 << 20  # the pickle part of any real file is far smaller; big tails are tensor bytes


def load_tensors(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(contents, safetensors metadata) of a weights file; any bad byte string is a ConceptorError."""
    import torch

    p = Path(path)
    if not p.exists():
        raise ConceptorError(f"file {p} does not exist")
    if not p.is_file():
        raise ConceptorError(f"{p} is a folder, not a weights file")
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS:
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # safetensors raises several types for malformed headers and data
            raise ConceptorError(f"{p.name} is not a valid .safetensors file ({_short(e)})") from None
    if suffix in PICKLES:
        try:
            with warnings.catch_warnings():  # torch's note on raw pickles would print above our one-line answer
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                data = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # torch words random bytes and hostile pickles alike; _why_unreadable tells them apart
            raise ConceptorError(_why_unreadable(p, e)) from None
        if not isinstance(data, dict):
            raise ConceptorError(f"{p.name} holds a {type(data).__name__}, not a dictionary of tensors")
        return data, {}
    raise ConceptorError(f"{p.name}: unknown weights format {suffix or '(no extension)'}; "
                         "use .safetensors (or .pt/.bin/.ckpt)")


def refuse_same_file(src: str | Path, dst: str | Path) -> None:
    """Writing a conversion onto its own input would replace the only copy of it (links and other spellings of
    the same path included): refuse before anything is read or written."""
    try:
        same = os.path.samefile(src, dst)
    except OSError:  # one of them does not exist (yet): they are not the same file
        return
    if same:
        raise ConceptorError(f"{dst} is the input file {src} itself; write the converted file under another "
                             "name (the input is never replaced)")


def _why_unreadable(p: Path, e: Exception) -> str:
    """One line on why torch.load refused ``p``: code in a real pickle, or bytes that are not a PyTorch file.

    torch raises the same "Weights only load failed" for both, so the pickle is read opcode by opcode
    (pickletools builds nothing and runs nothing) to see whether it is whole and which globals it names."""
    pickles, torch_format, why = _pickles_of(p)
    names = [g for globals_, _ in pickles for g in globals_]
    refused = any(w in str(e).lower() for w in ("unsupported global", "unsupported class"))
    # A torch file names torch's own globals, and torch calls out the ones it refused. A pickle that torch.save
    # did not write (a raw pickle.dump) builds whatever it names: any global there is code to run.
    if names and (refused or not torch_format):
        return (f"{p.name} is a pickle that holds code or objects, not just tensors; it was NOT loaded "
                "(loading it could run that code). Use a .safetensors version from a source you trust")
    if _is_safetensors(p):
        return f"{p.name} holds safetensors data under a {p.suffix} name; rename it to {p.stem}.safetensors"
    return (f"{p.name} is damaged or not a PyTorch file ({why}); nothing was loaded. Download it again, "
            "or use a .safetensors version")


def _pickles_of(p: Path) -> tuple[list[tuple[list[str], list]], bool, str]:
    """The whole pickles torch would read (a zip's data.pkl, else the file's start) as (globals, numbers),
    whether the file is in a torch.save format, and what is wrong with it if nothing in it names code."""
    with open(p, "rb") as f:
        head = f.read(_SCAN_BYTES)
    if not head.startswith(b"PK"):
        pickles = _scan(io.BytesIO(head))
        if pickles and _TORCH_MAGIC in pickles[0][1]:
            return pickles, True, "its data is cut short or corrupted"
        kind = "a plain pickle, not one torch.save wrote" if pickles else "neither a zip archive nor a pickle"
        return pickles, False, kind if head else "the file is empty"
    try:
        with zipfile.ZipFile(p) as z:
            info = next((i for i in z.infolist() if i.filename.endswith("data.pkl")), None)
            if info is None or info.file_size > _SCAN_BYTES:  # a huge data.pkl is no torch.save output
                return [], True, "a zip archive without PyTorch data"
            return _scan(io.BytesIO(z.read(info))), True, "its data is cut short or corrupted"
    except Exception:  # noqa: BLE001 - a zip cut short or corrupted fails in many ways
        return [], True, "its zip archive is cut short or corrupted"


def _scan(stream: io.BytesIO, limit: int = 5) -> list[tuple[list[str], list]]:
    """Whole pickles at the start of ``stream``; torch's legacy format is five in a row, then raw tensor bytes.

    Stops at the first pickle that does not parse to its end: random bytes, a cut, or the tensor bytes."""
    found = []
    for _ in range(limit):
        names, strings, numbers = [], [], []
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]) or "?")
                elif isinstance(arg, str):
                    strings.append(arg)
                elif isinstance(arg, int):
                    numbers.append(arg)
        except Exception:  # noqa: BLE001 - pickletools raises ValueError and friends on any bad opcode
            break
        found.append((names, numbers))
    return found


def _is_safetensors(p: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little endian) and then ``{``."""
    with open(p, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(p)


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:160] if text else type(e).__name__)

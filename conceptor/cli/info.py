"""``conceptor info FILE``: what a file says about how it was made (a PNG's generation settings, a weights
file's metadata header), read without loading any weights."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show a PNG's generation settings or a .safetensors file's metadata")
    p.add_argument("file", metavar="FILE", help="a PNG written by conceptor generate (or A1111), or a .safetensors")
    p.set_defaults(handler=run)


def run(args) -> None:
    import json
    from pathlib import Path

    from ..errors import ConceptorError

    path = Path(args.file)
    if not path.is_file():
        raise ConceptorError(f"{path} is not a file")
    if path.suffix.lower() == ".safetensors":
        print(json.dumps(_safetensors_header(path), indent=2))
        return
    from ..formats.png_info import parse_parameters, read_png_parameters

    try:
        text = read_png_parameters(path)
    except OSError:
        raise ConceptorError(f"{path.name} is neither a PNG nor a .safetensors file") from None
    if text is None:
        raise ConceptorError(f"{path.name} carries no generation settings (no 'parameters' text chunk)")
    prompt, negative, pairs = parse_parameters(text)
    print(f"prompt: {prompt}")
    if negative:
        print(f"negative prompt: {negative}")
    for key, value in pairs.items():
        print(f"{key}: {value}")


def _safetensors_header(path) -> dict:
    """The header's metadata and tensor count, read from the file's first bytes (the format's own layout:
    8-byte little-endian length, then that much JSON)."""
    import json
    import struct

    from ..errors import ConceptorError

    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= size <= 100_000_000:
            raise ConceptorError(f"{path.name} is not a valid .safetensors file (header length {size})")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise ConceptorError(f"{path.name} is not a valid .safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConceptorError(f"{path.name} is not a valid .safetensors file (header is not a mapping)")
    meta = header.pop("__metadata__", {})
    return {"tensors": len(header), "metadata": meta if isinstance(meta, dict) else {}}

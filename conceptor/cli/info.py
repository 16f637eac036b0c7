"""``conceptor info FILE``: what a file says about how it was made (a PNG's generation settings, a weights
file's metadata header), read without loading any weights."""
from __future__ import annotations

import json

# ModelSpec and kohya keys in the order a reader wants them: what the file is, then how it was trained.
_FIRST = ("modelspec.title", "modelspec.architecture", "modelspec.trigger_phrase", "modelspec.resolution",
          "modelspec.prediction_type", "modelspec.date", "modelspec.implementation",
          "modelspec.implementation_version", "modelspec.sai_model_spec",
          "ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_v2", "ss_network_module",
          "ss_network_dim", "ss_network_alpha", "ss_resolution", "ss_steps", "ss_epoch", "ss_training_started_at",
          "ss_training_finished_at", "ss_tag_frequency")
_TOP_TAGS = 10
_LONG = 200  # kohya files carry JSON blobs (ss_datasets, thumbnails as data URLs): shown cut to this


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show a PNG's generation settings or a .safetensors file's metadata")
    p.add_argument("file", metavar="FILE", help="a PNG written by conceptor generate (or A1111), or a .safetensors")
    p.add_argument("--json", action="store_true", help="print a .safetensors header's metadata as JSON (for scripts)")
    p.set_defaults(handler=run)


def run(args) -> None:
    from pathlib import Path

    from ..errors import ConceptorError

    path = Path(args.file)
    if not path.is_file():
        raise ConceptorError(f"{path} is not a file")
    if path.suffix.lower() == ".safetensors":
        header = _safetensors_header(path)
        if getattr(args, "json", False):
            print(json.dumps(header, indent=2))
        else:
            print("\n".join(describe_metadata(path.name, header["tensors"], header["metadata"])))
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


def describe_metadata(name: str, tensors: int, meta: dict) -> list[str]:
    """The lines ``info`` prints for a .safetensors header: ModelSpec and kohya keys first, then the rest."""
    lines = [f"{name}: {tensors} tensor{'s' if tensors != 1 else ''}"]
    if not meta:
        lines.append("no metadata: the header names only tensors (nothing says which model or run made it)")
        return lines
    known = [k for k in _FIRST if k in meta]
    spec = sorted(k for k in meta if k.startswith(("modelspec.", "ss_")) and k not in known)
    rest = sorted(k for k in meta if k not in known and k not in spec)
    width = min(max(len(k) for k in meta), 40)  # one absurd key does not push every value off the screen
    for key in known + spec + rest:
        lines.append(f"{_cut(key):<{width}}  {_value(key, meta[key])}")
    return lines


def _value(key: str, value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    try:
        if key == "ss_tag_frequency":
            return _tags(json.loads(text))
        if key == "conceptor.config":
            return _config(json.loads(text))
    except (ValueError, TypeError, AttributeError):  # a hand-edited or foreign value: shown as it is
        pass
    return _cut(text)


def _cut(text: str) -> str:
    # a header is anyone's text: no newlines or terminal escape sequences reach the user's terminal
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= _LONG else f"{text[:_LONG]}... ({len(text)} characters)"


def _tags(freq: dict) -> str:
    """kohya's {dataset: {tag: count}} as the most frequent tags over all datasets."""
    total: dict[str, int] = {}
    for tags in freq.values():
        for tag, n in tags.items():
            total[str(tag)] = total.get(str(tag), 0) + int(n)
    if not total:
        return "(no tags)"
    top = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{tag} ({n})" for tag, n in top[:_TOP_TAGS])
    more = f", +{len(top) - _TOP_TAGS} more" if len(top) > _TOP_TAGS else ""
    datasets = ", ".join(str(d) for d in freq)
    return _cut(f"{shown}{more} [{len(freq)} dataset{'s' if len(freq) != 1 else ''}: {datasets}]")


def _config(cfg: dict) -> str:
    """The run config in one line: method, steps, learning rate, LoRA rank (the full JSON is in --json)."""
    train, optim, lora = cfg.get("train") or {}, cfg.get("optim") or {}, cfg.get("lora") or {}
    parts = [f"method {cfg.get('method', '?')}"]
    if train.get("steps") is not None:
        parts.append(f"{train['steps']} steps")
    if optim.get("lr") is not None:
        parts.append(f"lr {optim['lr']:g}" if isinstance(optim["lr"], (int, float)) else f"lr {optim['lr']}")
    if lora.get("enabled") or (lora and "enabled" not in lora):
        kind = {"dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}.get(lora.get("adapter"), "LoRA")
        parts.append(f"{kind} rank {lora.get('rank', '?')}")
    if (cfg.get("model") or {}).get("model"):
        parts.append(f"model {cfg['model']['model']}")
    return _cut(", ".join(parts))


def _safetensors_header(path) -> dict:
    """The header's metadata and tensor count, read from the file's first bytes (the format's own layout:
    8-byte little-endian length, then that much JSON)."""
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

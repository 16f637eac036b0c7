"""``conceptor dataset check FILE``: what a run would train on, and the settings that would do nothing, before
any model is loaded (only a tokenizer, to count caption tokens). Exit 2 when there are problems."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("dataset", help="inspect a dataset before training")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=type(p))
    c = verbs.add_parser("check", help="report a dataset (kohya dataset config .toml, a folder or a CSV) and "
                                       "refuse settings that would silently do nothing")
    c.add_argument("file", metavar="FILE", help="a kohya dataset config .toml, a folder of images or a CSV")
    c.add_argument("--model", help="a local diffusers folder whose tokenizer counts caption tokens "
                                   "(without it, captions are measured in words)")
    c.add_argument("--resolution", type=int, help="training size the buckets are computed for (default 512)")
    c.add_argument("--token", help="the textual-inversion token every concept caption must contain")
    c.set_defaults(handler=run_check)


def _training_set(path):
    from ..data.dataset import load_training_set, read_training_set, shorthand
    from ..errors import ConceptorError

    if not path.exists():  # checked here so that a missing path is never tried as a hub dataset name
        raise ConceptorError(f"{path} does not exist; give a dataset config .toml, a folder of images or a CSV")
    if path.suffix.lower() == ".toml":
        return read_training_set(path)
    if path.is_dir() and not _is_source(path):  # a plain folder: captions optional, as --images reads it
        return load_training_set([shorthand("--images", image_dir=str(path))], f"--images {path}", squash=True)
    return load_training_set([shorthand("--dataset", source=str(path), caption_extension=None)],
                             f"--dataset {path}")


def _is_source(folder) -> bool:
    """A folder --dataset reads as rows (metadata.jsonl or a saved datasets folder), not as loose images."""
    return any((folder / name).is_file() for name in ("metadata.jsonl", "dataset_info.json", "dataset_dict.json"))


def _tokenizer(model: str | None):
    """(count_tokens, max_tokens) of the model's CLIP tokenizer, read from disk only; (None, None) without one.
    The bundled toy model's tokenizer is not used as a stand-in: its vocabulary is a few hundred words, so it
    splits ordinary captions into letters and would report most of them as too long."""
    from pathlib import Path

    from ..errors import ConceptorError

    if model is None:
        return None, None
    folder = Path(model).expanduser() / "tokenizer"
    if not folder.is_dir():
        raise ConceptorError(f"--model {model} is not a local diffusers folder with a tokenizer/ (dataset check "
                             "reads no network); give such a folder or leave --model out to count words")
    from transformers import CLIPTokenizer

    try:
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConceptorError(f"cannot read the tokenizer in {folder}: {str(e).splitlines()[0]}") from None
    # the same count and limit a training run logs (methods/trainset.py): with the start and end tokens
    return (lambda text: len(tok(text).input_ids)), tok.model_max_length


def run_check(args) -> int:
    import sys
    from pathlib import Path

    from ..data.report import problems, report, required_tokens

    ts = _training_set(Path(args.file))
    ts.assign_sizes(args.resolution or 512, 8)
    count, limit = _tokenizer(args.model)
    for line in report(ts, count, limit):
        print(line)
    bad = problems(ts, required_tokens(ts, args.token))
    for line in bad:
        print(line, file=sys.stderr)
    if bad:
        return 2
    reg = len(ts.entries(True))  # regularisation examples are drawn beside the concept ones, not counted in
    print(f"ok: {len(ts.items)} images in {len(ts.subsets)} subsets, {len(ts.entries(False))} examples per epoch"
          + (f" (and {reg} regularisation examples)" if reg else ""))
    return 0

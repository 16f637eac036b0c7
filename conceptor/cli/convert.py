"""``conceptor convert embedding IN OUT --to diffusers|a1111|kohya``."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert files between tools' formats")
    kinds = p.add_subparsers(dest="kind", required=True, parser_class=type(p))
    e = kinds.add_parser("embedding", help="textual-inversion embedding (diffusers, A1111 .pt/.safetensors, kohya)")
    e.add_argument("src", metavar="IN")
    e.add_argument("dst", metavar="OUT")
    e.add_argument("--to", required=True, choices=["diffusers", "a1111", "kohya"])
    e.add_argument("--token", help="token name when the input file does not carry one")
    e.set_defaults(handler=run_embedding)


def run_embedding(args) -> None:
    from .. import api

    emb = api.convert_embedding(args.src, args.dst, to=args.to, token=args.token)
    print(f"wrote {args.dst} ({args.to}): token {emb.token}, {emb.num_vectors} vector(s) x {emb.vectors.shape[-1]}")

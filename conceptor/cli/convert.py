"""``conceptor convert embedding|lora IN OUT --to FORMAT``."""
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
    lo = kinds.add_parser("lora", help="LoRA/DoRA/LoHa/LoKr weights (diffusers/PEFT <-> kohya/LyCORIS, as A1111, "
                                       "Forge and ComfyUI load)")
    lo.add_argument("src", metavar="IN")
    lo.add_argument("dst", metavar="OUT")
    lo.add_argument("--to", required=True, choices=["diffusers", "kohya"])
    lo.set_defaults(handler=run_lora)


def run_embedding(args) -> None:
    from .. import api

    emb = api.convert_embedding(args.src, args.dst, to=args.to, token=args.token)
    print(f"wrote {args.dst} ({args.to}): token {emb.token}, {emb.num_vectors} vector(s) x {emb.vectors.shape[-1]}")


def run_lora(args) -> None:
    from .. import api
    from ..formats.lycoris import kind_of, rank_of

    lora = api.convert_lora(args.src, args.dst, to=args.to)
    ranks = sorted({rank_of(layer) for layer in lora.values()})
    kinds = "/".join(sorted({kind_of(layer) for layer in lora.values()}, key=("lora", "dora", "loha", "lokr").index))
    kinds = "" if kinds == "lora" else f" ({kinds})"
    print(f"wrote {args.dst} ({args.to}): {len(lora)} layer(s){kinds}, rank {'/'.join(map(str, ranks))}")

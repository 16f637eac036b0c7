"""``conceptor toyworld pretrain|evaluate|bundle ...``: the bundled toy model's own tools (see conceptor/toyworld)."""
from __future__ import annotations

import argparse

TOOLS = {
    "pretrain": "train the toy-world model from scratch (VAE, then UNet + text encoder)",
    "evaluate": "evaluator accuracy of a model's samples on seen and held-out prompts",
    "bundle": "write a trained folder as the shipped fp16 model",
}


def add_parser(sub) -> None:
    p = sub.add_parser("toyworld", help="pretrain, evaluate or bundle the toy-world model")
    p.add_argument("tool", choices=list(TOOLS), help="; ".join(f"{k}: {v}" for k, v in TOOLS.items()))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the tool's own flags (see conceptor toyworld TOOL --help)")
    p.set_defaults(handler=run)


def run(args) -> None:
    import importlib

    module = importlib.import_module(f"conceptor.toyworld.{args.tool}")
    module.main(args.args)

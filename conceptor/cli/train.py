"""``conceptor train <method>``: flags -> RunConfig (over an optional --config file) -> api.train.

Every flag is derived from a config field (conceptor/config.py and each method's own section): the field's
metadata gives its help, name and choices, so a setting exists in one place and every flag reaches the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from ..config import SHARED_SECTIONS, LoraConfig, MethodSpec

# Help sections, in --help order after the method's own; a field may name another (group=...).
GROUPS = {"lora": "LoRA", "model": "model", "data": "data", "optim": "optimization", "train": "training"}


def _add_field(group, section: str, f: dataclasses.Field, hint) -> tuple[str, tuple[str, str]]:
    """One flag for one field; returns (argparse dest, (section, key))."""
    meta = f.metadata
    dest = f"{section}.{f.name}"
    kw = {"dest": dest, "default": None, "help": meta.get("help")}
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if base is bool:
        kw.update(action="store_const", const=True)
    elif typing.get_origin(base) is list:
        kw["action"] = "append"
    else:
        kw["type"] = base
        if meta.get("choices"):
            kw["choices"] = list(meta["choices"])
    group.add_argument(meta.get("flag") or "--" + f.name.replace("_", "-"), **kw)
    return dest, (section, f.name)


def _sections(spec: MethodSpec) -> dict[str, type]:
    """The sections a method's command has, its own first."""
    return {spec.section: spec.options, **({"lora": LoraConfig} if spec.adapters else {}), **SHARED_SECTIONS}


def add_method_parser(methods, spec: MethodSpec) -> None:
    p = methods.add_parser(spec.name, help=spec.help)
    groups: dict[str, argparse._ArgumentGroup] = {}
    flag_map: dict[str, tuple[str, str]] = {}
    for section, cls in _sections(spec).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if meta.get("cli", True) is False or spec.name not in meta.get("only", (spec.name,)):
                continue
            title = meta.get("group") or GROUPS.get(section, spec.name)
            if title not in groups:
                groups[title] = p.add_argument_group(title)
            dest, where = _add_field(groups[title], section, f, hints[f.name])
            flag_map[dest] = where
    groups["training"].add_argument("--config", metavar="FILE", help="YAML/TOML config; flags override it")
    p.set_defaults(handler=run, flag_map=flag_map)


def add_parser(sub) -> None:
    from ..methods import specs

    train = sub.add_parser("train", help="train a concept")
    methods = train.add_subparsers(dest="method", required=True, parser_class=type(train))
    for spec in specs():
        add_method_parser(methods, spec)


def config_from_args(args) -> "RunConfig":  # noqa: F821
    from ..config import build_config, read_config_file

    overrides: dict[str, dict] = {}
    for dest, (section, key) in args.flag_map.items():
        overrides.setdefault(section, {})[key] = getattr(args, dest, None)
    file_values = read_config_file(args.config) if args.config else None
    return build_config(args.method, file_values, overrides)


def run(args) -> None:
    import json

    from ..eval.during import train

    result = train(config_from_args(args))
    loss = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
    print(f"done: {result.step} steps, last loss {loss}; outputs in {result.output}")
    for f in result.files:
        print(f"  {f}")
    best = result.output / "best" / "best.json"
    if best.is_file():
        kept = json.loads(best.read_text())
        print(f"kept step {kept['step']} ({kept['metric']} {kept['score']:.4g}) as the output (--keep-best)")

"""Training methods, one file each, registered here by name: the only list of methods there is.

A method's file declares everything the rest of conceptor needs (its ``SPEC``: config section, defaults,
checks, what it is) and the class the loop trains (training/method.py). Adding a method is one new file
and one line below; see docs/architecture.md.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ConceptorError

if TYPE_CHECKING:  # the registry itself stays free of imports, so config can look methods up by name
    from ..config import MethodSpec

# name on the command line -> the module (in this package) that defines SPEC
REGISTRY = {
    "textual-inversion": "textual_inversion",
    "dreambooth": "dreambooth",
    "finetune": "finetune",
    "pivotal": "pivotal",
}


def get_spec(name: str) -> MethodSpec:
    if name not in REGISTRY:
        raise ConceptorError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    return importlib.import_module(f"{__name__}.{REGISTRY[name]}").SPEC


def specs() -> list[MethodSpec]:
    return [get_spec(name) for name in REGISTRY]


def get_method(name: str):
    """A fresh instance of the method's class, ready for the loop."""
    return get_spec(name).make()

"""Known-bad package combinations, caught before they fail deep inside a library.

transformers and diffusers each refuse a peft older than their own ``MIN_PEFT_VERSION`` the moment a
LoRA is added or loaded (transformers 5.24 wanted peft 0.22 before it was published). Reading their
own minimums, rather than a table of ours, keeps this right for releases that do not exist yet.
"""
from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path

from packaging.version import Version

from .errors import ConceptorError

# (package, module that holds its MIN_PEFT_VERSION)
_PEFT_USERS = (("transformers", "transformers.integrations.peft"), ("diffusers", "diffusers.utils.constants"))
LOCK = Path(__file__).resolve().parent.parent / "constraints.txt"  # present in a checkout, not in a wheel


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def tested_versions(packages: tuple[str, ...], lock: Path = LOCK) -> dict[str, str]:
    """``{package: version}`` from the lock file the test suite passed with, when this is a checkout."""
    if not lock.is_file():
        return {}
    pinned = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and name.lower().replace("_", "-") in packages:
            pinned[name.lower().replace("_", "-")] = version.strip()
    return pinned


def peft_problem() -> str | None:
    """One line saying which packages to install, or None when the installed set can use adapters."""
    peft = installed("peft")
    if peft is None:
        return "LoRA training and loading need peft: pip install peft"
    for package, module in _PEFT_USERS:
        version = installed(package)
        if version is None:
            continue
        minimum = getattr(importlib.import_module(module), "MIN_PEFT_VERSION", None)
        if minimum is None or Version(Version(peft).base_version) >= Version(minimum):
            continue
        tested = tested_versions(("transformers", "diffusers", "peft"))
        fix = (" or install the tested set: pip install " + " ".join(f"'{k}=={v}'" for k, v in sorted(tested.items()))
               if tested else f" or install an older {package}")
        return (f"{package} {version} needs peft >= {minimum} but peft {peft} is installed: "
                f"pip install 'peft>={minimum}'{fix}")
    return None


def check_adapter_stack() -> None:
    """Raise one actionable line when the installed transformers/diffusers/peft cannot handle LoRAs."""
    problem = peft_problem()
    if problem:
        raise ConceptorError(problem)

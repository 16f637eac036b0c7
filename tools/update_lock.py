"""Move constraints.txt (the lock) forward: newest allowed versions, tested, written only when green.

    python tools/update_lock.py                 # newest versions the pyproject ranges allow
    python tools/update_lock.py --only peft     # move one package (others stay at the lock)
    python tools/update_lock.py --torch 2.14.1  # torch is held at the lock's version unless named

torch is held because its build is the machine's (CPU here, CUDA on a GPU machine): moving it is a
decision, not a side effect, and a CUDA build's nvidia-*/triton wheels are never written to the lock.

In a scratch virtual environment it installs conceptor with the test extra from the pyproject ranges alone
(so whatever is newest today), runs the lint and the whole test suite offline, and prints what changed
against the lock. It rewrites constraints.txt only when both pass; otherwise it prints the failing tests
and leaves the lock as it was. A failure it finds is a bound to add to pyproject.toml (or code to fix).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
MACHINE_SPECIFIC = ("nvidia-", "cuda-", "triton")  # what a CUDA torch build pulls in; not ours to pin
HEADER = """\
# The exact set the test suite and lint passed with (Python {python}, on {date}).
# Install it:   pip install -c constraints.txt -e ".[test]"
# Move it on:   python tools/update_lock.py   (rewrites this file only when everything passes)
# torch is pinned by version only: on a GPU machine the same version's CUDA build satisfies it.
"""


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[_norm(name)] = version.strip()
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, text=True, **kw)


def frozen(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all", "--exclude-editable"], capture_output=True,
                         text=True, check=True).stdout
    pins = {}
    for line in out.splitlines():
        name, sep, version = line.partition("==")
        if sep and not _norm(name).startswith(MACHINE_SPECIFIC):
            pins[_norm(name)] = version.split("+")[0]  # local labels (+cpu, +cu124) are the machine's build
    return pins


def diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    rows = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a != b:
            rows.append(f"  {name}: {a or '(new)'} -> {b or '(gone)'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="PKG", help="upgrade only these; keep every other pin")
    p.add_argument("--venv", metavar="DIR", help="scratch venv folder (default: a new temporary one)")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-x'")
    p.add_argument("--torch", metavar="VERSION", help="move torch to this version (default: keep the lock's)")
    args = p.parse_args(argv)

    old = read_lock()
    venv = Path(args.venv or tempfile.mkdtemp(prefix="conceptor-lock-")) / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    install = [str(py), "-m", "pip", "install", "-q", "--upgrade", "-e", ".[test]"]
    keep = {"torch": args.torch or old.get("torch")} if (args.torch or old.get("torch")) else {}
    if args.only:  # every other package held at the lock
        keep.update({k: v for k, v in old.items() if k not in {_norm(n) for n in args.only}})
    held = Path(venv.parent / "held.txt")
    held.write_text("".join(f"{k}=={v}\n" for k, v in keep.items()))
    install += ["-c", str(held)]
    if _run(install).returncode:
        print("install failed: the newest versions do not resolve together; lock unchanged")
        return 1
    new = frozen(py)
    changes = diff(old, new)
    print("changes against the lock:" if changes else "no version changed", *changes, sep="\n")

    import datetime
    import platform

    text = HEADER.format(python=platform.python_version(), date=datetime.date.today().isoformat())
    text += "".join(f"{k}=={v}\n" for k, v in sorted(new.items()))
    candidate = venv.parent / "constraints.txt"
    candidate.write_text(text)
    # The suite checks the lock against pyproject (tests/test_environment.py): it must check this candidate,
    # or a dependency added to pyproject could never get into the lock through this tool.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CONCEPTOR_LOCK": str(candidate)}
    lint = _run([str(py), "-m", "ruff", "check", "."], env=env)
    tests = _run([str(py), "-m", "pytest", "-p", "no:cacheprovider", *args.pytest_args.split()], env=env,
                 capture_output=True)
    print(tests.stdout[-3000:])
    if lint.returncode or tests.returncode:
        failed = [ln for ln in tests.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        print("lock unchanged; what broke with these versions:", *(failed or ["(lint)"]), sep="\n  ")
        return 1
    tmp = LOCK.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, LOCK)
    print(f"wrote {LOCK.name}: {len(new)} pins, {len(changes)} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``conceptor train|generate|convert|lora|eval|info|dataset|demo|ui``.

Parse, then call the API; nothing else here.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from ..errors import ConceptorError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # bad flags: one line and exit 2, like every other user error
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (tests and notebooks swap it), not the one seen at start."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _close_progress_bars() -> None:
    """A progress bar left open by an error would put the error on the bar's line; close them first."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def build_parser() -> argparse.ArgumentParser:
    from . import convert, dataset, demo, eval, generate, info, lora, toyworld, train, ui

    parser = _Parser(prog="conceptor", description="Teach Stable Diffusion new concepts and generate with them.")
    parser.add_argument("--version", action="version", version=f"conceptor {__import__('conceptor').__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (train, generate, convert, lora, eval, info, dataset, demo, toyworld, ui):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if any("\x00" in str(a) for a in (sys.argv[1:] if argv is None else argv)):
        print("error: an argument contains a NUL byte, which no path or prompt can hold; remove it", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and bad flags end here; keep main() callable in-process
        return int(e.code or 0)
    log_handler = _StderrHandler()
    log_handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, handlers=[log_handler], force=True)
    # bitsandbytes (--quantize) logs a missing optional kernel package whenever diffusers imports it
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        try:
            code = args.handler(args)  # a handler may return an exit code (dataset check: 2 on problems)
        except BaseException:
            _close_progress_bars()
            raise
    except ConceptorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, vanished files: what the OS said, about which file
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        hint = ("; files written before are intact (every write is atomic): free space, then --resume latest"
                if e.errno == errno.ENOSPC else "")
        print(f"error: {e.strerror or e}{where}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are kept (resume with --resume latest)", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0

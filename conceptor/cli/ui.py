"""``conceptor ui``: the web page to generate, train and look at runs."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("ui", help="web page: generate, train (a job queue), inspect runs")
    p.add_argument("--runs-dir", default="conceptor-runs", metavar="D",
                   help="where jobs and generated images go, and runs are found (default ./conceptor-runs)")
    p.add_argument("--models-dir", metavar="D", help="diffusers folders and single-file checkpoints to offer")
    p.add_argument("--embeddings-dir", metavar="D", help="textual-inversion files; token = file name, as in A1111")
    p.add_argument("--loras-dir", metavar="D", help="LoRA files, used as <lora:NAME:WEIGHT> in a prompt")
    p.add_argument("--data-dir", action="append", default=[], metavar="D",
                   help="where typed image folders / datasets may lie (repeatable; default: the runs dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (other than 127.0.0.1 needs --auth)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="require this login")
    p.add_argument("--auth-file", metavar="FILE", help="logins, one user:password per line")
    p.set_defaults(handler=run)


def run(args) -> None:
    from pathlib import Path

    from ..errors import ConceptorError
    from ..ui.server import check_bind, read_auth

    auth = read_auth(args.auth, args.auth_file)
    check_bind(args.host, auth)  # before the heavy imports: a refusal is instant
    if not 0 < args.port < 65536:
        raise ConceptorError(f"--port must be between 1 and 65535, got {args.port}")
    for flag, value in (("--models-dir", args.models_dir), ("--embeddings-dir", args.embeddings_dir),
                        ("--loras-dir", args.loras_dir), *(("--data-dir", d) for d in args.data_dir)):
        if value is not None and not Path(value).is_dir():
            raise ConceptorError(f"{flag} {value} is not a folder; create it or fix the path")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConceptorError("the web page needs gradio: pip install 'conceptor[ui]'") from None
    from ..ui.folders import Folders
    from ..ui.server import serve

    runs = Path(args.runs_dir)
    if runs.exists() and not runs.is_dir():
        raise ConceptorError(f"--runs-dir {runs} is a file; give a folder")
    runs.mkdir(parents=True, exist_ok=True)
    serve(Folders(runs=runs, models=args.models_dir, embeddings=args.embeddings_dir, loras=args.loras_dir,
                  data=args.data_dir), host=args.host, port=args.port, auth=auth)

"""``conceptor demo``: textual inversion end to end on the bundled default, with a report."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="learn a sample concept with textual inversion and write a report")
    p.add_argument("--output", default="conceptor-demo", metavar="DIR")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --output")
    p.set_defaults(handler=run)


def run(args) -> None:
    from ..demo import run_demo

    report = run_demo(args.output, steps=args.steps, overwrite=args.overwrite)
    print(f"demo done in {report['wall_seconds']:.0f} s; report: {report['report_html']}")
    for key, value in report["summary"].items():
        print(f"  {key}: {value}")

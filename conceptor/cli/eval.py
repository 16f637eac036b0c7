"""``conceptor eval RUN``: fidelity, similarity, editability (and DreamBooth prior retention) of a run."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure what a run learned (toy-world evaluator)")
    p.add_argument("run", metavar="RUN", help="a textual-inversion or dreambooth run folder (holds config.yaml)")
    p.add_argument("--model", help="model to evaluate with (default: the run's)")
    p.add_argument("--num-images", type=int, default=16, help="images per measure (default 16)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-prompt", help="DreamBooth: class prompt for prior retention (default: the run's)")
    p.set_defaults(handler=run)


def run(args) -> None:
    from ..eval.run import evaluate_run

    scores = evaluate_run(args.run, model=args.model, n=args.num_images, steps=args.steps,
                          guidance=args.guidance, seed=args.seed, class_prompt=args.class_prompt)
    for key, value in scores.items():
        print(f"{key}: {value}")

"""``conceptor eval RUN``: fidelity, similarity, editability (and DreamBooth prior retention) of a concept run;
style adoption and shape/colour accuracy on held-out prompts of a fine-tuning run."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure what a run learned (toy-world evaluator)")
    p.add_argument("run", metavar="RUN",
                   help="a textual-inversion, dreambooth or finetune run folder (holds config.yaml)")
    p.add_argument("--model", help="model to evaluate with (default: the run's)")
    p.add_argument("--num-images", type=int, default=16,
                   help="images per measure (default 16; finetune: per held-out prompt)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-prompt", help="DreamBooth: class prompt for prior retention (default: the run's)")
    p.add_argument("--clip-model", metavar="M",
                   help="real-model metrics instead of the toy world: CLIP-T and CLIP-I with this CLIP (hub id in "
                        "the cache, or folder; e.g. openai/clip-vit-large-patch14)")
    p.add_argument("--dino-model", metavar="M",
                   help="real-model metrics instead of the toy world: DINO similarity and DreamBooth prior drift "
                        "with this ViT (e.g. facebook/dino-vits16)")
    p.set_defaults(handler=run)


def run(args) -> None:
    from ..eval.run import evaluate_run

    if args.clip_model or args.dino_model:
        from .eval_metrics import print_metrics, run_metrics

        print_metrics(run_metrics(args))
        return
    scores = evaluate_run(args.run, model=args.model, n=args.num_images, steps=args.steps,
                          guidance=args.guidance, seed=args.seed, class_prompt=args.class_prompt)
    if scores["method"] == "finetune":
        _print_finetune(scores)
        return
    for key, value in scores.items():
        print(f"{key}: {value}")


def _print_finetune(scores: dict) -> None:
    style = scores["style"]
    print(f"style of the training images: {' '.join(style.values()) if style else 'none shared'}")
    print(f"held-out prompts: {len(scores['held_out_prompts'])} x {scores['images_per_prompt']} images, "
          f"{scores['sampling_steps']} steps, guidance {scores['guidance']}")
    print("model      prompts      style  shape  colour")
    for name in ("base", "finetuned"):
        for label, row in (("held-out", scores[name]), ("never-drawn", scores[name].get("never_drawn"))):
            if row:
                adopted = f"{row['style']:.0%}" if "style" in row else "-"
                print(f"{name:<10} {label:<12} {adopted:>5}  {row['shape']:>5.0%}  {row['color']:>6.0%}")

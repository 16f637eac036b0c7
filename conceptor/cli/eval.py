"""``conceptor eval RUN``: fidelity, similarity, editability (and DreamBooth prior retention) of a concept run;
style adoption and shape/colour accuracy on held-out prompts of a fine-tuning run. With ``--clip-model`` /
``--dino-model``: the DreamBooth paper's real-model metrics (CLIP-T, CLIP-I, DINO, prior drift) instead."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConceptorError

# DreamBench's 25 object prompts (Ruiz et al. 2022, the dataset's prompts_and_classes.txt): recontextualisation,
# then property changes. {} is the run's subject ("sks toy", or a textual-inversion token).
PROMPTS = [f"a {{}} {where}" for where in (
    "in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
    "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
    "with a blue house in the background", "on top of a purple rug in a forest", "with a wheat field in the background",
    "with a tree and autumn leaves in the background", "with the Eiffel Tower in the background",
    "floating on top of water", "floating in an ocean of milk", "on top of green grass with sunflowers around it",
    "on top of a mirror", "on top of the sidewalk in a crowded street", "on top of a dirt road",
    "on top of a white rug")] + [f"a {what} {{}}" for what in ("red", "purple", "shiny", "wet", "cube shaped")]


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
        _print_metrics(real_metrics(args))
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


def real_metrics(args) -> dict:
    """CLIP-T / CLIP-I / DINO of each concept of the run over the DreamBench prompts, and (DreamBooth, pivotal)
    the class-prior drift against the base model; also written to RUN/eval-metrics.json."""
    from .. import api
    from ..data.images import load_image
    from ..eval import run as R
    from ..eval.metrics import concept_metrics, load_clip, load_dino

    run = Path(args.run)
    cfg = R._saved_config(run)
    method = cfg["method"]
    if method == "finetune":
        raise ConceptorError("--clip-model/--dino-model measure concept runs (textual-inversion, dreambooth, "
                             "pivotal); evaluate a finetune run without them")
    # the metric models load first: a missing one fails in a second, not after minutes of sampling
    clip = load_clip(args.clip_model) if args.clip_model else None
    dino = load_dino(args.dino_model) if args.dino_model else None
    base = args.model or cfg.get("model", {}).get("model")
    loaded, class_prompt = _run_model(run, cfg, base, args.class_prompt)
    per_prompt = max(1, args.num_images // len(PROMPTS))  # the paper: 4 per prompt, i.e. --num-images 100
    kw = dict(steps=args.steps, guidance=args.guidance)

    def generate(prompt, n, seed):
        return loaded.generate(prompt, num_images=n, seed=seed, **kw)

    results = []
    for k, (subject, paths) in enumerate(R._concepts(cfg)):
        drift = class_prompt if k == 0 else None  # the class prior is one per model, measured once
        base_generate = None
        if drift:
            base_model = api.load(base)

            def base_generate(prompt, n, seed):
                return base_model.generate(prompt, num_images=n, seed=seed, **kw)
        scores = concept_metrics(generate, [p.format(subject) for p in PROMPTS], [load_image(p) for p in paths],
                                 clip=clip, dino=dino, class_prompt=drift, base_generate=base_generate,
                                 n=per_prompt, seed=args.seed)
        results.append({"subject": subject, **scores})
    out = {"method": method, **results[0], "prompts": len(PROMPTS), "images_per_prompt": per_prompt,
           "sampling_steps": args.steps, "guidance": loaded.default_guidance if args.guidance is None else
           args.guidance, "seed": args.seed, "clip_model": args.clip_model, "dino_model": args.dino_model}
    if class_prompt:
        out["class_prompt"] = class_prompt
    if len(results) > 1:
        out["concepts"] = results
    _write_metrics(run, out)
    return out


def _run_model(run: Path, cfg: dict, base: str | None, class_prompt: str | None):
    """The trained model as evaluate_run loads it (eval/run.py), and the class prompt for prior drift."""
    from .. import api
    from ..eval.run import _trained_model

    method = cfg["method"]
    if method == "textual-inversion":
        embeddings = [p for p in sorted(run.glob("learned_embeds*.safetensors")) if "-steps-" not in p.name]
        if not embeddings:
            raise ConceptorError(f"{run} has no learned_embeds.safetensors yet; finish or resume the run first")
        return api.load(base, embeddings), None
    if method == "pivotal":
        loaded = _trained_model(run, base, True)
        for emb in sorted(run.glob("learned_embeds*.safetensors")):
            if "-steps-" not in emb.name:
                loaded.add_embedding(emb)
        return loaded, class_prompt or cfg["pivotal"].get("class_prompt")
    return (_trained_model(run, base, bool(cfg.get("lora", {}).get("enabled"))),
            class_prompt or cfg["dreambooth"].get("class_prompt"))


def _write_metrics(run: Path, scores: dict) -> None:
    from ..fileio import write_text
    from ..training.manifest import Manifest

    write_text(run / "eval-metrics.json", json.dumps(scores, indent=2))
    manifest = Manifest.read(run)
    if manifest is not None:  # the run's own file now: --overwrite removes it with the rest
        manifest.add(run / "eval-metrics.json")


def _print_metrics(scores: dict) -> None:
    names = {"clip_t": "CLIP-T (prompt vs image)", "clip_i": "CLIP-I (generated vs training)",
             "dino": "DINO (generated vs training)",
             "prior_drift": f"prior drift (1 - {scores.get('prior_drift_model', '').upper()} similarity to the base "
                            "model's class images)"}
    n = scores["images_per_prompt"]
    print(f"{scores['method']} run, subject {scores['subject']!r}: {scores['prompts']} prompts x {n} "
          f"image{'s' if n != 1 else ''}, {scores['sampling_steps']} steps, guidance {scores['guidance']}")
    for row in scores.get("concepts", [scores]):
        if "concepts" in scores:
            print(f"concept {row['subject']!r}:")
        for key, label in names.items():
            if key in row:
                print(f"{key}: {row[key]:.4f}  {label}")

"""A procedural world of coloured shapes where learning can be measured offline (issue 3).

``world.py`` renders images and captions deterministically from a seed. Some shapes are drawn in
pretraining images but never named in captions (textual inversion must find their word), and one never
appears at all (for DreamBooth to teach). ``pretrain.py`` trains an SD-1.5-shaped model on it,
``evaluator.py`` is a small CNN that reads shape/colour/background off any image, ``evaluate.py`` scores
a model's samples with it, and ``bundle.py`` writes the shipped fp16 folder.

Only paths here: importing the package loads no torch or diffusers.
"""
from pathlib import Path

HERE = Path(__file__).parent
MODEL_FOLDER = HERE / "model"  # diffusers StableDiffusionPipeline folder + recipe.json
FLUX_MODEL_FOLDER = HERE / "flux_model"  # a Flux.1-shaped FluxPipeline folder (pretrain_flow.py) + recipe.json
EVALUATOR_FOLDER = HERE / "evaluator"  # model.safetensors + config.json

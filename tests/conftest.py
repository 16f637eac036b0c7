"""Shared fixtures: tiny SD-shaped models built in code, concept image folders, an in-process CLI runner."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    from conceptor.models.tiny import build_tiny_pipeline_folder

    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny") / "sd1", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    from conceptor.models.tiny import build_tiny_pipeline_folder

    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny") / "sd2", "sd2")


def draw_concept(path: Path, i: int, size: int = 64) -> None:
    im = Image.new("RGB", (size, size), (40, 70, 200))
    d = ImageDraw.Draw(im)
    d.ellipse([10 + 2 * i, 12, 50, 52 - i], fill=(245, 205, 30))
    im.save(path)


@pytest.fixture()
def concept_images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        draw_concept(folder / f"{i}.png", i)
    return folder


@pytest.fixture()
def cli(capsys):
    """Run ``conceptor ARGS`` in this process; returns (exit code, stdout, stderr)."""
    from conceptor.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from conceptor.models.tiny import build_tiny_pipeline_folder

    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny") / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from conceptor.models.tiny import build_tiny_pipeline_folder

    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny") / "flux", "flux")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    from conceptor.models.tiny import build_tiny_pipeline_folder

    return build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny") / "sd3", "sd3")

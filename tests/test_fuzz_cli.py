"""Hostile-user fuzzing of the CLI: hypothesis draws every subcommand's flags from each flag's domain edges
(0, -1, 2**63, NaN, inf, empty and odd strings, the wrong kind of path) and points outputs at damaged run
folders, a user's photos and a user's files. The property: exit 0 or 2, never a traceback (an exception
escaping ``main`` fails the test), and nothing changes outside what the run's manifest lists.

Examples are derandomized (the same every CI run) and bounded: training is at most 2 steps on a tiny model.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conceptor.cli import build_parser, main
from conceptor.training.manifest import MANIFEST

INTS = st.sampled_from(["-1", "0", "1", "2", "3", str(2**63), str(2**63 - 1)])
FLOATS = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e-3", "0.5", "1", "1e30"])
TEXT = st.sampled_from(["", " ", "a", "<t>", "toy", "a photo of sks toy", "two words", "é" * 80, "x" * 400,
                        "{}", "a\nb", "\x00"])
SMALL = {"steps": st.sampled_from(["-1", "0", "1", "2"]),
         "epochs": st.sampled_from(["-1", "0", "1", str(2**63)]),
         "num_images": st.sampled_from(["-1", "0", "1", "2", str(2**63)])}
PLACES = ["new", "new", "new", "run", "damaged-run", "linked-run", "images", "user", "user-file", "fifo",
          "missing/deep"]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_sd1):
    """A user's world: photos (with their own config.yaml), a folder of their files, one finished run."""
    from PIL import Image

    root = tmp_path_factory.mktemp("fuzz")
    (root / "images").mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(root / "images" / f"{i}.png")
    (root / "images" / "config.yaml").write_text("method: textual-inversion\n")
    (root / "user").mkdir()
    (root / "user" / "notes.txt").write_text("keep me")
    (root / "user-file.txt").write_text("a file, not a folder")
    os.mkfifo(root / "fifo")
    (root / "data.csv").write_text("image_path,caption\n" + "".join(f"images/{i}.png,a thing {i}\n"
                                                                    for i in range(3)))
    assert main(["train", "textual-inversion", "--model", str(tiny_sd1), "--images", str(root / "images"),
                 "--token", "<t>", "--init-token", "toy", "--steps", "2", "--checkpoint-every", "1",
                 "--output", str(root / "run")]) == 0
    return root


_fresh = itertools.count()


def _place(root, name):
    """An output: a new folder each time for "new" (so valid examples do run), else one of the user's places."""
    if name == "new":
        return str(root / f"out-{next(_fresh)}")
    return str(root / {"user-file": "user-file.txt"}.get(name, name))


def _damage(root, kind):
    """Fresh copies of the finished run, damaged one way or another."""
    for name in ("damaged-run", "linked-run"):
        shutil.rmtree(root / name, ignore_errors=True)
        shutil.copytree(root / "run", root / name, symlinks=True)
    target = root / "damaged-run"
    if kind == "config":
        (target / "config.yaml").write_bytes(b"\xff\x00: [")
    elif kind == "manifest":
        (target / MANIFEST).write_text('{"files": "everything"}')
    latest = max((target / "checkpoints").glob("step-*"), default=None)  # an --overwrite may have shortened it
    if kind == "state" and latest is not None:
        (latest / "state.json").write_text('{"step": -4}')
    elif kind == "metrics":
        (target / "metrics.jsonl").write_text("[1]\n{\"step\": \"x\"}\n\x00\n")
    elif kind == "optimizer" and latest is not None:
        (latest / "optimizer.pt").write_bytes(os.urandom(64))
    (root / "linked-run" / "loss.png").unlink()
    os.symlink(root / "user" / "notes.txt", root / "linked-run" / "loss.png")


def _snapshot(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read())
            else:
                out[rel] = ("other", None)
    return out


def _owned(root, output):
    """Files the command may have changed: what the output's manifest lists (before or after), its manifest
    and lock, and for generate/convert the output file(s) themselves."""
    allowed = set()
    if output:
        rel = os.path.relpath(output, root)
        allowed |= {rel, os.path.join(rel, MANIFEST), os.path.join(rel, ".conceptor.lock")}
        try:
            allowed |= {os.path.join(rel, f) for f in json.loads((root / rel / MANIFEST).read_text())["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return allowed


def _check(root, argv, output, generated=()):
    before = _snapshot(root)
    allowed_before = _owned(root, output)

    def timeout(*_):
        raise TimeoutError(f"conceptor {' '.join(argv)} ran over 120 s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)  # a hang guard, not a speed test: a loaded machine must not trip it
    try:
        code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert code in (0, 2), f"exit {code} for {argv}"
    after = _snapshot(root)
    allowed = allowed_before | _owned(root, output)
    rel_out = os.path.relpath(output, root) if output else None
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    for k in changed:
        under_output = rel_out is not None and (k == rel_out or k.startswith(rel_out + os.sep))
        if rel_out is not None and rel_out.startswith(k + os.sep) and after.get(k, ("",))[0] == "other":
            continue  # a folder made on the way to the output
        emptied = before.get(k, ("",))[0] == "other" and k not in after and all(  # a folder --overwrite emptied
            f in allowed for f in before if f.startswith(k + os.sep) and before[f][0] == "file")
        ok = k in allowed or (under_output and (os.path.basename(k) in generated or k.endswith(".tmp") or emptied
                                                or "/class_images" in "/" + k or after.get(k, ("",))[0] == "other"))
        assert ok, f"conceptor {' '.join(map(str, argv))} changed {k}, which it did not own"
    return code


def _optional_flags(parser: argparse.ArgumentParser, draw, skip=()):
    """Zero to three flags of the parser, each with a value from its domain's edges. Few flags per example
    keep some examples valid (they train or generate, and so exercise the folders); argparse's own type
    errors are tested elsewhere, so values are of the right type but at the edges."""
    actions = [a for a in parser._actions if a.option_strings
               and a.dest.rsplit(".", 1)[-1] not in ("help", "config", *skip)]
    chosen = draw(st.lists(st.sampled_from(actions), min_size=0, max_size=3, unique_by=lambda a: a.dest))
    words = []
    for action in chosen:
        flag = action.option_strings[0]
        if action.nargs == 0:
            words.append(flag)
            continue
        key = action.dest.rsplit(".", 1)[-1]  # train flags' dests are section.key
        if key in SMALL:
            value = draw(SMALL[key])
        elif action.choices:
            value = draw(st.sampled_from([str(c) for c in action.choices]))
        elif action.type is int:
            value = draw(INTS)
        elif action.type is float:
            value = draw(FLOATS)
        else:
            value = draw(TEXT)
        words += [flag, value]
    return words


def _subparser(*path):
    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(data=st.data())
def test_train_any_flags_any_folder(sandbox, tiny_sd1, data):
    draw = data.draw  # everything is drawn before anything is done: the sandbox changes between examples
    method = draw(st.sampled_from(["textual-inversion", "dreambooth", "finetune"]))
    damage = draw(st.sampled_from(["config", "manifest", "state", "metrics", "optimizer", "none"]))
    output = _place(sandbox, draw(st.sampled_from(PLACES)))
    required = {"textual-inversion": ["--token", "<fz>", "--init-token", "toy", "--images", str(sandbox / "images")],
                "dreambooth": ["--instance-prompt", "a photo of sks toy", "--images", str(sandbox / "images")],
                "finetune": ["--dataset", str(sandbox / "data.csv"), "--cache-dir", "none"]}[method]
    argv = ["train", method, "--model", str(tiny_sd1), *required, "--steps", "1", "--output", output,
            "--checkpoint-every", "1", "--num-class-images" if method == "dreambooth" else "--log-every", "1",
            *draw(st.sampled_from([[], [], ["--resume", "latest"], ["--overwrite"]]))]
    # Flags that would make a valid run long are drawn small (SMALL); the rest from their domain edges.
    argv += _optional_flags(_subparser("train", method), draw,
                            skip=("model", "images", "dataset", "output", "class_images", "cache_dir",
                                  "validation_prompt", "model_config", "vae", "resume", "overwrite"))
    _damage(sandbox, damage)
    _check(sandbox, argv, output)


@FUZZ
@given(data=st.data())
def test_generate_any_flags(sandbox, tiny_sd1, data):
    draw = data.draw
    output = _place(sandbox, draw(st.sampled_from(PLACES)))
    argv = ["generate", "--model", str(tiny_sd1), "--prompt", draw(TEXT), "--output", output, "--steps", "1"]
    argv += _optional_flags(_subparser("generate"), draw, skip=("model", "prompt", "output", "embedding", "lora",
                                                                 "model_config", "vae", "steps"))
    if draw(st.booleans()):
        argv += ["--lora", draw(st.sampled_from([str(sandbox / "run"), str(sandbox / "user-file.txt"),
                                                 str(sandbox / "run" / "config.yaml") + ":nan"]))]
    if draw(st.booleans()):
        argv += ["--embedding", draw(st.sampled_from([str(sandbox / "run"), str(sandbox / "run") + ":<other>",
                                                      str(sandbox / "images" / "0.png")]))]
    generated = {"grid.png", "generation.json"} | {f"{i:03d}-seed{s}.png" for i in range(4) for s in range(-2, 8)}
    _check(sandbox, argv, output, generated)


@FUZZ
@given(data=st.data())
def test_convert_and_eval_any_input(sandbox, data):
    draw = data.draw
    damage = draw(st.sampled_from(["config", "manifest", "state", "none"]))
    src = draw(st.sampled_from([str(sandbox / "run" / "learned_embeds.safetensors"), str(sandbox / "user-file.txt"),
                                str(sandbox / "fifo"), str(sandbox / "images" / "0.png"), str(sandbox / "nothing.pt")]))
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["embedding", "lora"]))
        dst = draw(st.sampled_from([str(sandbox / "conv.safetensors"), str(sandbox / "conv.pt"), src,
                                    str(sandbox / "fifo"), str(sandbox / "user-file.txt"), str(sandbox / "user")]))
        to = draw(st.sampled_from(["diffusers", "kohya", "a1111"] if kind == "embedding" else ["diffusers", "kohya"]))
        argv = ["convert", kind, src, dst, "--to", to]
        _damage(sandbox, damage)
        if dst == str(sandbox / "conv.safetensors") or dst == str(sandbox / "conv.pt"):
            for name in ("conv.safetensors", "conv.pt"):
                (sandbox / name).unlink(missing_ok=True)
        _check(sandbox, argv, dst if "conv." in dst else None)
    else:
        run = draw(st.sampled_from([str(sandbox / "damaged-run"), str(sandbox / "user"), str(sandbox / "images"),
                                    str(sandbox / "user-file.txt")]))
        argv = ["eval", run, "--num-images", draw(st.sampled_from(["0", "1", "-1"])), "--steps", "1"]
        _damage(sandbox, damage)
        _check(sandbox, argv, run if run.endswith("run") else None, {"eval.json"} |
               {f"eval-{n}.png" for n in ("before", "after", "class", "base", "finetuned", "fidelity", "editability")})

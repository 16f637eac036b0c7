"""Every CLI flag reaches the run: given a value other than its default, each train flag changes the saved
config.yaml (and `generate`'s flags change what reaches the API). A flag that reaches nothing fails here,
unless it is listed below as a pure alias of a default."""
from __future__ import annotations

import argparse

import pytest
import yaml

from conceptor.cli import build_parser, main
from conceptor.cli.train import config_from_args

REQUIRED = {  # the smallest valid command per method; a flag under test replaces its own entry
    "textual-inversion": ["--token", "<t>", "--init-token", "toy", "--images", "imgs"],
    "dreambooth": ["--instance-prompt", "a photo of sks toy", "--images", "imgs"],
    "finetune": ["--dataset", "data.csv"],
    "pivotal": ["--token", "<t>", "--init-token", "toy", "--images", "imgs"],
}
# Flags that on purpose only restate a default (none today: finetune's --center-crop, once one, now sets
# data.center_crop like every method's).
PURE_ALIASES: set[tuple[str, str]] = set()
NOT_SETTINGS = {"help", "config"}  # --config names the file the settings come from
# Values other than the defaults that pass validation, where the generic ones below would not.
VALUES = {"resolution": "72", "vectors": "3", "class_prompt": "a photo of a toy", "class_images": "class-dir",
          "instance_prompt": "a photo of {} toy", "ti_frac": "0.37", "lokr_factor": "4"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _value_for(action: argparse.Action, default) -> list[str]:
    """Command-line words that give ``action`` a value other than ``default``."""
    if isinstance(action, argparse._StoreConstAction):
        return [action.option_strings[0]]
    key = action.dest.rsplit(".", 1)[-1]  # train flags' dests are section.key
    if key in VALUES:
        return [action.option_strings[0], VALUES[key]]
    if action.choices:
        return [action.option_strings[0], next(str(c) for c in action.choices if c != default)]
    if action.type is int:
        return [action.option_strings[0], "7"]
    if action.type is float:
        return [action.option_strings[0], "0.37"]
    return [action.option_strings[0], f"value-of-{action.dest}"]


def _train_cases():
    train = _subparsers(build_parser())["train"]
    for method, parser in _subparsers(train).items():
        for action in parser._actions:
            if action.option_strings and action.dest not in NOT_SETTINGS:
                yield pytest.param(method, action, id=f"{method}:{action.option_strings[0]}")


def _config(argv: list[str]) -> dict:
    args = build_parser().parse_args(argv)
    return yaml.safe_load(config_from_args(args).to_yaml())


@pytest.mark.parametrize(("method", "action"), list(_train_cases()))
def test_every_train_flag_reaches_the_saved_config(method, action):
    base_argv = ["train", method, *REQUIRED[method]]
    base = _config(base_argv)
    flag = action.option_strings[0]
    section, key = _find_key(method, action.dest)
    default = base.get(section, {}).get(key) if section else None
    words = _value_for(action, default)
    argv = list(base_argv)
    if flag in argv:  # a required flag under test: replace its value
        i = argv.index(flag)
        del argv[i:i + 2]
    if flag == "--dataset":  # it replaces --images (and the instance prompt: its rows carry their captions)
        for other in ("--images", "--instance-prompt"):
            if other in argv:
                i = argv.index(other)
                del argv[i:i + 2]
    if flag == "--keep-best":  # needs scores to compare
        argv += ["--eval-every", "5"]
        base = _config(base_argv + ["--eval-every", "5"])
    if flag == "--class-images":  # needs prior preservation on to be valid
        argv += ["--class-prompt", "a photo of a toy"]
        base = _config(base_argv + ["--class-prompt", "a photo of a toy"])
    if flag in ("--lokr-factor", "--lokr-decompose-both"):  # they shape a LoKr only
        argv += ["--adapter", "lokr"]
        base = _config(base_argv + ["--adapter", "lokr"])
    needs_lora = method in ("dreambooth", "finetune")  # pivotal tuning always trains a LoRA
    if needs_lora and (flag in ("--lora-text-encoder", "--init-lora") or flag == "--quantize"):
        argv += ["--lora"]  # both need a LoRA run to be valid (--quantize freezes the base)
        base = _config(base_argv + ["--lora"])
    changed = _config(argv + words)
    diff = {(s, k) for s in changed for k in (changed[s] if isinstance(changed[s], dict) else {})
            if changed[s][k] != (base.get(s) or {}).get(k)}
    if (method, action.dest) in PURE_ALIASES:
        assert not diff, f"{flag} was listed as a pure alias of a default but changes {diff}"
        return
    assert diff, f"{method} {flag} {words[1:]} reaches nothing in config.yaml"
    assert (section, key) in diff, f"{flag} changed {diff}, not {section}.{key}"


def _find_key(method: str, dest: str) -> tuple[str | None, str | None]:
    """The (section, key) the CLI maps a flag to; (None, None) for a flag it maps nowhere."""
    args = build_parser().parse_args(["train", method, *REQUIRED[method]])
    return args.flag_map.get(dest, (None, None))


def test_the_run_writes_exactly_the_resolved_config(tiny_sd1, concept_images, tmp_path, cli):
    argv = ["train", "textual-inversion", "--model", str(tiny_sd1), "--images", str(concept_images), "--token",
            "<t>", "--init-token", "toy", "--steps", "1", "--checkpoint-every", "0", "--snr-gamma", "5",
            "--validation-images", "1", "--output", str(tmp_path / "run")]
    code, _, err = cli(*argv)
    assert code == 0, err
    expected = _config(argv)
    assert expected["train"]["min_timestep"] is None  # textual inversion's window waits for the model's family
    expected["train"]["min_timestep"] = 400  # a UNet: the method's DDPM window (a flow model would get 0)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == expected


GENERATE_VALUES = {"seed": "7", "num_images": "2", "batch_size": "3", "steps": "9", "width": "72",
                   "height": "72", "guidance": "3.5"}


@pytest.mark.parametrize("action", [a for a in _subparsers(build_parser())["generate"]._actions
                                    if a.option_strings and a.dest not in NOT_SETTINGS],
                         ids=lambda a: a.option_strings[0])
def test_every_generate_flag_reaches_the_api(action, monkeypatch, tmp_path):
    from conceptor import api

    calls = []

    class Loaded:
        default_guidance = 7.5

        def generate(self, prompt, **kw):
            calls.append(("generate", prompt, kw))
            return []

    monkeypatch.setattr(api, "load", lambda *a, **kw: calls.append(("load", a, kw)) or Loaded())
    monkeypatch.setattr(api, "save_images", lambda images, out, settings, overwrite=False:
                        calls.append(("save", str(out), overwrite)) or [])

    def reached(extra: list[str]) -> list:
        calls.clear()
        assert main(["generate", "--prompt", "p", "--output", str(tmp_path / "o"), *extra]) == 0
        return list(calls)

    base = reached([])
    flag = action.option_strings[0]
    if action.dest in GENERATE_VALUES:
        words = [flag, GENERATE_VALUES[action.dest]]
    elif flag == "--prompt":
        words = [flag, "another prompt"]
    elif flag == "--output":
        words = [flag, str(tmp_path / "other")]
    else:
        words = _value_for(action, action.default)
    assert reached(words) != base, f"generate {flag} reaches nothing"

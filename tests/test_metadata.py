"""The metadata header of every .safetensors conceptor writes (ModelSpec + kohya ss_* keys), and ``conceptor info``."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from conceptor.formats.bundle import write_bundle
from conceptor.formats.embeddings import Embedding, write_embedding
from conceptor.formats.lora import write_lora
from conceptor.formats.metadata import build_metadata, model_name, scrub_paths, weights_hash

_ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
_STARTED, _FINISHED = 1_700_000_000.5, 1_700_003_600.25


def _lora() -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"unet.{_ATTN}.to_q": (torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g))}


def _header(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _config(tmp_path) -> dict:
    """A resolved run config (RunConfig.to_dict's shape) full of absolute paths."""
    return {"method": "dreambooth",
            "model": {"model": str(tmp_path / "models" / "my-sd15"), "vae": None},
            "data": {"images": str(tmp_path / "photos" / "dog"), "resolution": 512},
            "optim": {"lr": 0.0001},
            "train": {"output": str(tmp_path / "runs" / "dog-lora"), "steps": 500,
                      "validation_prompts": [f"a dog, see {tmp_path}/ref.png"]},
            "lora": {"enabled": True, "rank": 8, "alpha": None, "init_from": str(tmp_path / "old.safetensors")},
            "dreambooth": {"class_data": str(tmp_path / "class")}}


def _meta(tmp_path, keep_paths=False, **kw) -> dict:
    args = dict(family="sd1", title="Dog LoRA", trigger_phrase="sks dog",
                base_model=str(tmp_path / "models" / "my-sd15"),
                base_model_hash="0123456789abcdef", rank=8, alpha=4, steps=500, epoch=2, started_at=_STARTED,
                finished_at=_FINISHED, tag_frequency={str(tmp_path / "photos" / "dog"): {"sks dog": 4, "grass": 1}},
                output_name="dog-lora", config=_config(tmp_path), keep_paths=keep_paths)
    return build_metadata(**{**args, **kw})


def _no_paths(meta: dict, tmp_path) -> None:
    home = os.path.expanduser("~")
    for key, value in meta.items():
        assert str(tmp_path) not in value and home not in value and not value.startswith("/"), (key, value)


def test_required_keys_and_formats(tmp_path):
    meta = _meta(tmp_path)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "Dog LoRA" and meta["modelspec.trigger_phrase"] == "sks dog"
    assert meta["modelspec.resolution"] == "512x512" and meta["modelspec.prediction_type"] == "epsilon"
    import datetime
    assert meta["modelspec.date"] == datetime.datetime.fromtimestamp(int(_FINISHED)).isoformat()
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_sd_model_name"] == "my-sd15"  # the folder's name, not its path
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_steps"] == "500" and meta["ss_epoch"] == "2"
    assert meta["ss_training_started_at"] == "1700000000.5" and meta["ss_training_finished_at"] == "1700003600.25"
    assert meta["ss_resolution"] == "(512, 512)" and meta["ss_output_name"] == "dog-lora"
    assert json.loads(meta["ss_tag_frequency"]) == {"dog": {"sks dog": 4, "grass": 1}}
    assert meta["conceptor.base_model_hash"] == "0123456789abcdef" and meta["conceptor.version"]
    cfg = json.loads(meta["conceptor.config"])
    assert cfg["train"]["steps"] == 500 and cfg["lora"]["rank"] == 8 and cfg["model"]["model"] == "my-sd15"
    assert cfg["train"]["validation_prompts"] == ["a dog, see ref.png"]
    _no_paths(meta, tmp_path)


def test_architectures_follow_kohya():
    sdxl = build_metadata(family="sdxl", base_model="stabilityai/stable-diffusion-xl-base-1.0", rank=4)
    assert sdxl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert sdxl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert sdxl["modelspec.resolution"] == "1024x1024" and sdxl["ss_base_model_version"] == "sdxl_base_v1-0"
    assert sdxl["ss_sd_model_name"] == "stabilityai/stable-diffusion-xl-base-1.0"  # a hub id stays whole
    assert sdxl["ss_network_alpha"] == "4.0"  # alpha defaults to the rank, as conceptor writes it
    ti = build_metadata(family="sd1", kind="textual-inversion", trigger_phrase="<cat>")
    assert ti["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert "ss_network_dim" not in ti and "ss_network_module" not in ti
    flux = build_metadata(family="flux", base_model="black-forest-labs/FLUX.1-dev", rank=16)
    assert flux["modelspec.architecture"] == "flux-1-dev/lora" and flux["ss_base_model_version"] == "flux1"
    assert "modelspec.prediction_type" not in flux
    schnell = build_metadata(family="flux", base_model="black-forest-labs/FLUX.1-schnell")
    assert schnell["modelspec.architecture"] == "flux-1-schnell/lora"
    v = build_metadata(family="sd2", kind="checkpoint", prediction_type="v_prediction", resolution=768)
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v" and v["ss_v2"] == "True"
    assert v["modelspec.prediction_type"] == "v" and v["ss_base_model_version"] == "sd_v2_v"
    with pytest.raises(ValueError, match="unknown model family"):
        build_metadata(family="sd9")


def test_scrub_paths(tmp_path, monkeypatch):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    home = os.path.expanduser("~")
    got = scrub_paths({"a": "/srv/models/sd15/", "b": f"{home}/x/y.safetensors", "c": "data/cats",
                       "d": "runwayml/stable-diffusion-v1-5", "e": ["C:\\Users\\me\\lora.safetensors", 3, None],
                       "f": "~/photos", "g": "a photo of AC/DC", "h": f"file://{home}/z.png",
                       "i": "--model=/opt/m/base lr 1e-4", str(tmp_path / "k"): ("/", 1.5), "j": tmp_path / "p"})
    assert got == {"a": "sd15", "b": "y.safetensors", "c": "cats", "d": "runwayml/stable-diffusion-v1-5",
                   "e": ["lora.safetensors", 3, None], "f": "photos", "g": "a photo of AC/DC", "h": "file:z.png",
                   "i": "--model=base lr 1e-4", "k": ("/", 1.5), "j": "p"}
    assert model_name("/srv/models/sd15/") == "sd15" and model_name("org/model") == "org/model"
    assert model_name("/srv/models/sd15", keep_paths=True) == "/srv/models/sd15"


def test_lora_round_trip(tmp_path):
    path = write_lora(_lora(), tmp_path / "dog.safetensors", "kohya", metadata=_meta(tmp_path))
    meta = _header(path)
    assert meta["format"] == "pt"  # the writer's own key stays
    assert meta["ss_network_dim"] == "8" and meta["modelspec.title"] == "Dog LoRA"
    assert json.loads(meta["conceptor.config"])["data"]["images"] == "dog"
    _no_paths(meta, tmp_path)
    # the writer's structural keys win over a caller's
    path = write_lora(_lora(), tmp_path / "d2.safetensors", metadata={"format": "x", "ss_steps": 3})
    assert _header(path) == {"format": "pt", "ss_steps": "3"}
    assert _header(write_lora(_lora(), tmp_path / "plain.safetensors")) == {"format": "pt"}


def test_keep_paths(tmp_path):
    meta = _meta(tmp_path, keep_paths=True)
    path = write_lora(_lora(), tmp_path / "dog.safetensors", metadata=meta)
    got = _header(path)
    assert got["ss_sd_model_name"] == str(tmp_path / "models" / "my-sd15")
    cfg = json.loads(got["conceptor.config"])
    assert cfg["train"]["output"] == str(tmp_path / "runs" / "dog-lora")
    assert str(tmp_path / "photos" / "dog") in json.loads(got["ss_tag_frequency"])


def test_embedding_and_bundle_round_trip(tmp_path):
    ti = build_metadata(family="sd1", kind="textual-inversion", trigger_phrase="<cat>", steps=100,
                        config=_config(tmp_path))
    for fmt in ("diffusers", "a1111", "kohya"):
        meta = _header(write_embedding(Embedding("<cat>", torch.randn(2, 32)), tmp_path / f"{fmt}.safetensors",
                                       fmt, metadata=ti))
        assert meta["format"] == fmt and meta["token"] == "<cat>"
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion" and meta["ss_steps"] == "100"
        _no_paths(meta, tmp_path)
    sdxl = _header(write_embedding(Embedding("<cat>", torch.randn(2, 32), torch.randn(2, 64)),
                                   tmp_path / "xl.safetensors", "kohya", metadata={"modelspec.title": "cat"}))
    assert sdxl == {"format": "kohya", "token": "<cat>", "modelspec.title": "cat"}
    # an A1111 .pt keeps its own fields; the metadata has nowhere to go and is not an error
    pt = write_embedding(Embedding("<cat>", torch.randn(2, 32)), tmp_path / "cat.pt", "a1111", step=7, metadata=ti)
    assert torch.load(pt, weights_only=True)["step"] == 7
    path = write_bundle(_lora(), [Embedding("cat", torch.randn(2, 32))], tmp_path / "bundle.safetensors",
                        metadata=_meta(tmp_path, trigger_phrase="cat"))
    meta = _header(path)
    assert meta["bundle_emb"] == "cat" and meta["format"] == "pt" and meta["modelspec.trigger_phrase"] == "cat"
    _no_paths(meta, tmp_path)


def test_checkpoint_round_trip(tmp_path, tiny_sd1):
    from diffusers import StableDiffusionPipeline

    from conceptor.formats.ldm_checkpoint import save_single_file

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1), local_files_only=True, safety_checker=None)
    meta = build_metadata(family="sd1", kind="checkpoint", base_model=str(tiny_sd1),
                          base_model_hash=weights_hash(pipe.unet), config=_config(tmp_path))
    path = save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "m.safetensors", "sd1", metadata=meta)
    got = _header(path)
    assert got["format"] == "ldm" and got["family"] == "sd1" and got["prediction_type"] == "epsilon"
    assert got["modelspec.architecture"] == "stable-diffusion-v1" and got["ss_sd_model_name"] == tiny_sd1.name
    assert got["conceptor.base_model_hash"] == weights_hash(pipe.unet.state_dict())
    _no_paths(got, tmp_path)


def test_weights_hash():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    first = weights_hash(net)
    assert len(first) == 16 and int(first, 16) >= 0
    assert weights_hash(net) == first == weights_hash(dict(reversed(list(net.state_dict().items()))))
    half = {k: v.half() for k, v in net.state_dict().items()}
    assert weights_hash(half) == weights_hash({k: v.float() for k, v in half.items()})  # exact upcast, same hash
    from conceptor.data.cache import fingerprint
    assert fingerprint(net) == first  # the cache key and the file's hash name one model alike
    with torch.no_grad():
        net[1].bias[0] += 1e-3
    assert weights_hash(net) != first


def test_info_prints_metadata(cli, tmp_path):
    meta = _meta(tmp_path, tag_frequency={"dog": {f"tag{i}": i for i in range(1, 13)}})
    path = write_lora(_lora(), tmp_path / "dog.safetensors", "kohya", metadata=meta)
    code, out, err = cli("info", path)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "dog.safetensors: 3 tensors"  # down, up, alpha
    keys = [line.split()[0] for line in lines[1:]]
    assert keys[:3] == ["modelspec.title", "modelspec.architecture", "modelspec.trigger_phrase"]
    assert keys.index("ss_tag_frequency") < keys.index("conceptor.config") < keys.index("format")
    text = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert text["modelspec.title"] == "Dog LoRA" and text["ss_network_dim"] == "8"
    assert text["ss_tag_frequency"].startswith("tag12 (12), tag11 (11), tag10 (10)")
    assert "+2 more [1 dataset: dog]" in text["ss_tag_frequency"] and "tag1 (1)" not in text["ss_tag_frequency"]
    assert text["conceptor.config"] == "method dreambooth, 500 steps, lr 0.0001, LoRA rank 8, model my-sd15"
    assert str(tmp_path) not in out
    code, out, _ = cli("info", "--json", path)
    assert code == 0 and json.loads(out)["metadata"]["ss_network_dim"] == "8"


def test_info_without_metadata_and_damaged(cli, tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    code, out, err = cli("info", tmp_path / "bare.safetensors")
    assert code == 0 and out.startswith("bare.safetensors: 1 tensor\nno metadata"), (out, err)
    # foreign values: a non-JSON tag frequency and config, a terminal escape, a huge blob
    save_file({"a": torch.zeros(2)}, str(tmp_path / "odd.safetensors"),
              metadata={"ss_tag_frequency": "{broken", "conceptor.config": "[1]", "x": "\x1b[2Jboom\nline",
                        "ss_datasets": "y" * 5000})
    code, out, err = cli("info", tmp_path / "odd.safetensors")
    assert code == 0 and "Traceback" not in err, err
    assert "{broken" in out and "\x1b" not in out and " [2Jboom line" in out and "... (5000 characters)" in out
    good = (tmp_path / "dog.safetensors")
    write_lora(_lora(), good, metadata=_meta(tmp_path))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:40])  # a download cut off inside the header
    code, _, err = cli("info", tmp_path / "cut.safetensors")
    assert code == 2 and "not a valid .safetensors" in err and len(err.strip().splitlines()) == 1, err

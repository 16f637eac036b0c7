"""The web page below the browser: folder rules, what the lists find, uploads, the job queue, the CLI's refusals.

The queue tests run a stand-in worker (a small script given as the queue's python) so they test the queue's
own logic (order, one job per device, cancel, a page restart, a worker that dies) in seconds; the browser
tests (test_ui_browser.py) run real training jobs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("gradio")

from conceptor.errors import ConceptorError  # noqa: E402
from conceptor.ui import folders as F  # noqa: E402
from conceptor.ui.generation import split_loras, uses_token  # noqa: E402
from conceptor.ui.jobs import Queue, format_eta, progress  # noqa: E402
from conceptor.ui.training import TrainForm, check_uploads, copy_uploads, form_config, upload_root  # noqa: E402

TOY_IMAGES = Path(__file__).parent.parent / "conceptor" / "toyworld" / "concept"


# -- paths --------------------------------------------------------------------------------------------

def test_inside_keeps_typed_paths_in_the_page_folders(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "secret"
    (root / "cats").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    assert F.inside("cats", [root]) == (root / "cats").resolve()
    assert F.inside("./cats/", [root]) == (root / "cats").resolve()
    for bad, why in [("/etc", "absolute"), ("../secret", "'..'"), ("cats/../../secret", "'..'"),
                     ("escape", "outside"), ("missing", "not in any"), ("", "give a"), ("a\x00b", "NUL"),
                     ("C:\\Windows", "absolute")]:
        with pytest.raises(ConceptorError, match=why):
            F.inside(bad, [root])


def test_lists_find_models_embeddings_loras_runs_and_the_hub_cache(tmp_path, tiny_sd1, monkeypatch):
    import torch
    from safetensors.torch import save_file

    models, emb, loras, runs = (tmp_path / n for n in ("models", "embeddings", "loras", "runs"))
    for d in (models, emb / "sub", loras, runs):
        d.mkdir(parents=True)
    shutil.copytree(tiny_sd1, models / "tiny")
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(2)}, str(models / "merged.safetensors"))
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, str(models / "not-a-model.safetensors"))
    save_file({"emb_params": torch.zeros(1, 32)}, str(emb / "sub" / "shiny-cat.safetensors"))
    (emb / ".hidden.pt").write_bytes(b"x")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, str(loras / "inky.safetensors"))
    run = runs / "job1" / "output"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "textual-inversion",
                                                    "textual_inversion": {"token": "<tok>"}}))
    (run / ".conceptor-run.json").write_text('{"format": 1, "files": []}')
    save_file({"<tok>": torch.zeros(1, 32)}, str(run / "learned_embeds.safetensors"))
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-sd" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    (cache / "models--someone--tiny-sd" / "refs").mkdir()
    (cache / "models--someone--tiny-sd" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    f = F.Folders(runs=runs, models=models, embeddings=emb, loras=loras)
    found = F.list_models(f)
    assert found["tiny"] == str((models / "tiny").resolve())
    assert "merged.safetensors" in found and "not-a-model.safetensors" not in found
    assert not any("unet" in k or "text_encoder" in k for k in found)  # a diffusers folder's weights are not models
    assert found.get("hub: someone/tiny-sd") == "someone/tiny-sd"
    assert list(F.list_embeddings(f)) == ["shiny-cat", "<tok>"]  # A1111: token = file stem; runs: their token
    assert F.list_embeddings(f)["shiny-cat"][1] == "shiny-cat"
    assert list(F.list_loras(f)) == ["inky"]
    assert list(F.list_runs(f)) == ["job1"]


# -- prompts ------------------------------------------------------------------------------------------

def test_lora_tags_and_tokens_in_prompts():
    assert split_loras("a <lora:toy:0.8> cat <lora:ink>") == ("a cat", [("toy", 0.8), ("ink", 1.0)])
    for bad in ("<lora:toy:lots>", "<lora:toy:nan>"):
        with pytest.raises(ConceptorError, match="weight"):
            split_loras(bad)
    assert uses_token("a <cat-toy>, sitting", "<cat-toy>")
    assert not uses_token("a category", "cat") and uses_token("a cat.", "cat")


# -- uploads ------------------------------------------------------------------------------------------

@pytest.fixture()
def upload_dir(monkeypatch, tmp_path):
    root = tmp_path / "gradio-uploads"
    root.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(root))
    return root


def test_uploads_are_checked_like_the_cli_checks_images(upload_dir, tmp_path):
    good = []
    for i in range(3):
        shutil.copy(TOY_IMAGES / f"{i}.png", upload_dir / f"{i}.png")
        good.append(str(upload_dir / f"{i}.png"))
    (upload_dir / "0.txt").write_text("a red crescent")
    assert len(check_uploads(good + [str(upload_dir / "0.txt")])) == 4
    (upload_dir / "weights.pt").write_bytes(b"\x80\x04pickle")
    (upload_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (upload_dir / "big.png").write_bytes(b"\x00" * 2_000_001)
    elsewhere = tmp_path / "elsewhere.png"
    shutil.copy(TOY_IMAGES / "0.png", elsewhere)
    for files, why in [([str(upload_dir / "weights.pt")], "only images"), ([str(upload_dir / "broken.png")],
                       "cannot read image"), ([str(elsewhere)], "not an upload"),
                       ([str(upload_dir / "0.txt")], "no images")]:
        with pytest.raises(ConceptorError, match=why):
            check_uploads(files)
    with pytest.raises(ConceptorError, match="limited to 2 MB"):
        check_uploads([str(upload_dir / "big.png")], max_mb=2)
    with pytest.raises(ConceptorError, match="at most 2"):
        check_uploads(good, max_files=2)
    assert upload_root() == upload_dir.resolve()
    shutil.copy(TOY_IMAGES / "0.png", upload_dir / "a b;$(x).PNG")
    copy_uploads([upload_dir / "a b;$(x).PNG"], tmp_path / "dest")
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["a_b_x.png"]


def test_form_config_for_each_method_refuses_what_cannot_run(tmp_path):
    runs = tmp_path / "runs"
    (runs / "pics").mkdir(parents=True)
    f = F.Folders(runs=runs)
    ti = form_config(TrainForm("textual-inversion", token="<t>", init_word="object", steps=40, folder="pics"), f, None)
    assert ti["data"]["images"] == str((runs / "pics").resolve())
    assert ti["textual_inversion"]["token"] == "<t>" and ti["train"]["validation_prompts"] == ["a photo of a <t>"]
    assert ti["train"]["batch_size"] == 8 and ti["optim"]["lr"] == 5e-3  # the demo's toy-world settings
    db = form_config(TrainForm("dreambooth", instance_prompt="a photo of sks toy", lora=True, rank=8, steps=40,
                               folder="pics", lr=1e-4), f, None)
    assert db["lora"] == {"enabled": True, "rank": 8, "adapter": "lora"} and db["optim"]["lr"] == 1e-4
    ft = form_config(TrainForm("finetune", steps=10, folder="pics"), f, None)
    assert ft["finetune"]["dataset"] == str((runs / "pics").resolve())
    with pytest.raises(ConceptorError, match="upload images or type a folder"):
        form_config(TrainForm("textual-inversion", token="<t>"), f, None)
    with pytest.raises(ConceptorError, match="'..'"):
        form_config(TrainForm("textual-inversion", folder="../x"), f, None)
    with pytest.raises(ConceptorError, match="not in the list"):
        form_config(TrainForm("textual-inversion", model="/etc/passwd", folder="pics"), f, None)


# -- the queue ----------------------------------------------------------------------------------------

FAKE_WORKER = '''#!{python}
import json, signal, sys, time
from pathlib import Path
folder, attempt = Path(sys.argv[3]), int(sys.argv[4])
plan = json.loads((folder / "plan.json").read_text())
(folder / f"started-{{attempt}}").write_text(str(time.time()))
rc = 0
try:
    end = time.time() + plan.get("seconds", 0.5)
    while time.time() < end:
        time.sleep(0.05)
    rc = plan.get("rc", 0)
except KeyboardInterrupt:
    rc = 130
if attempt in plan.get("crash", ()):
    sys.exit(9)  # dies without a result: the queue must resume it
(folder / "result.json").write_text(json.dumps({{"rc": rc, "error": None if rc == 0 else "error: planned",
                                               "ended": time.time(), "attempt": attempt}}))
'''


@pytest.fixture()
def fake_python(tmp_path):
    path = tmp_path / "fake-python"
    path.write_text(FAKE_WORKER.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def _submit(queue: Queue, tmp_path: Path, **plan):
    images = tmp_path / "imgs"
    if not images.exists():
        shutil.copytree(TOY_IMAGES, images)
    config = {"data": {"images": str(images)}, "textual_inversion": {"token": "<q>", "init_token": "object"},
              "train": {"steps": 10}}
    return queue.submit("textual-inversion", config,
                        prepare=lambda folder: (folder / "plan.json").write_text(json.dumps(plan)))


def _until(queue: Queue, job_id: str, statuses: tuple[str, ...], timeout: float = 30.0):
    end = time.time() + timeout
    while time.time() < end:
        queue.tick()
        job = queue.get(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"{job_id} still {queue.get(job_id).status}")


def test_queue_runs_one_job_per_device_in_order(tmp_path, fake_python):
    queue = Queue(tmp_path / "runs", ["cpu"], python=fake_python)
    a = _submit(queue, tmp_path, seconds=0.6)
    b = _submit(queue, tmp_path, seconds=0.1, rc=2)
    c = _submit(queue, tmp_path, seconds=0.1)
    assert [j.id for j in queue.jobs()] == [a.id, b.id, c.id]
    queue.tick()
    assert [j.status for j in queue.jobs()] == ["running", "queued", "queued"]
    _until(queue, c.id, ("done",))
    done = {j.id: j for j in queue.jobs()}
    assert done[a.id].status == "done" and done[b.id].status == "failed"
    assert done[b.id].state["error"] == "error: planned"
    starts = [float((j.folder / "started-1").read_text()) for j in (done[a.id], done[b.id], done[c.id])]
    assert starts == sorted(starts)
    assert done[b.id].state["started"] >= done[a.id].state["ended"] - 0.01  # never two at once on one device
    saved = yaml.safe_load((done[a.id].folder / "config.yaml").read_text())
    assert saved["train"]["output"] == str(done[a.id].folder / "output")


def test_two_devices_run_two_jobs(tmp_path, fake_python):
    queue = Queue(tmp_path / "runs", ["cuda:0", "cuda:1"], python=fake_python)
    jobs = [_submit(queue, tmp_path, seconds=2) for _ in range(3)]
    queue.tick()
    running = [j for j in queue.jobs() if j.status == "running"]
    assert len(running) == 2 and {j.state["device"] for j in running} == {"cuda:0", "cuda:1"}
    for j in jobs:
        queue.cancel(j.id)
    _until(queue, jobs[1].id, ("cancelled",))


def test_cancel_a_queued_and_a_running_job(tmp_path, fake_python):
    queue = Queue(tmp_path / "runs", ["cpu"], python=fake_python)
    a = _submit(queue, tmp_path, seconds=30)
    b = _submit(queue, tmp_path, seconds=0.1)
    queue.tick()
    assert queue.cancel(b.id).status == "cancelled"
    _until(queue, a.id, ("running",))
    time.sleep(0.3)  # let the worker reach its loop
    queue.cancel(a.id)
    job = _until(queue, a.id, ("cancelled",), timeout=10)
    assert job.state.get("rc") == 130
    assert not (b.folder / "started-1").exists()
    with pytest.raises(ConceptorError, match="already ended"):
        queue.cancel(a.id)


def test_a_new_page_finds_running_jobs_and_resumes_dead_ones(tmp_path, fake_python):
    runs = tmp_path / "runs"
    first = Queue(runs, ["cpu"], python=fake_python)
    a = _submit(first, tmp_path, seconds=1.5)
    first.tick()
    second = Queue(runs, ["cpu"], python=fake_python)  # the page restarted: a new queue on the same folder
    b = _submit(second, tmp_path, seconds=0.1)
    second.tick()
    assert second.get(a.id).status == "running" and second.get(b.id).status == "queued"  # a is still alive
    _until(second, b.id, ("done",))
    assert second.get(a.id).state["attempts"] == 1

    crash = _submit(second, tmp_path, seconds=0.1, crash=[1])
    job = _until(second, crash.id, ("done",))
    assert job.state["attempts"] == 2 and job.state["resume"] is True  # died without a result: run again, resumed
    always = _submit(second, tmp_path, seconds=0.1, crash=[1, 2, 3, 4])
    job = _until(second, always.id, ("failed",))
    assert job.state["attempts"] == 3 and "died 3 times" in job.state["error"]


def test_a_killed_worker_is_resumed_and_its_stale_pid_is_not_trusted(tmp_path, fake_python):
    queue = Queue(tmp_path / "runs", ["cpu"], python=fake_python)
    a = _submit(queue, tmp_path, seconds=30)
    job = _until(queue, a.id, ("running",))
    os.killpg(job.state["pid"], signal.SIGKILL)
    end = time.time() + 20
    while queue.get(a.id).state["attempts"] < 2 and time.time() < end:
        queue.tick()
        time.sleep(0.05)
    job = queue.get(a.id)
    assert job.status == "running" and job.state["attempts"] == 2 and job.state["resume"] is True
    while not (a.folder / "started-2").exists() and time.time() < end:  # the second attempt really runs
        time.sleep(0.05)
    assert (a.folder / "started-2").exists()
    queue.cancel(a.id)
    _until(queue, a.id, ("cancelled",))


def test_submit_refuses_a_bad_config_and_leaves_nothing(tmp_path, fake_python):
    queue = Queue(tmp_path / "runs", ["cpu"], python=fake_python)
    with pytest.raises(ConceptorError):
        queue.submit("textual-inversion", {"data": {"images": str(TOY_IMAGES)},
                                           "textual_inversion": {"token": "<q>", "init_token": "object"},
                                           "train": {"steps": -3}})
    assert [p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")] == []


def test_progress_eta_and_log_line(tmp_path, fake_python):
    queue = Queue(tmp_path / "runs", ["cpu"], python=fake_python)
    job = _submit(queue, tmp_path, seconds=0.1)
    job.state["status"] = "running"
    (job.output).mkdir()
    rows = [{"step": 2, "loss": 0.5, "lr": 1e-3, "elapsed_s": 10.0}, {"step": 4, "loss": 0.4, "lr": 1e-3,
            "elapsed_s": 20.0}, {"step": 5, "loss": 0.3, "lr": 1e-3, "elapsed_s": 1.0},  # resumed
            {"step": 6, "loss": 0.3, "lr": 1e-3, "elapsed_s": 3.0}]
    (job.output / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (job.folder / "job.log").write_bytes(b"loading\ncaching:  10%\rcaching: 100%\r\ntraining:  60%|#  | 6/10\r")
    p = progress(job)
    assert (p["step"], p["steps"], p["fraction"]) == (6, 10, 0.6)
    assert p["eta_s"] == pytest.approx(8.0)  # 4 steps left at 0.5 steps/s, from the rows since the resume
    assert p["log"] == "training:  60%|#  | 6/10"
    assert format_eta(8.0) == "0:08" and format_eta(3725) == "1:02:05" and format_eta(None) == "-"


# -- the page's handlers ------------------------------------------------------------------------------

def test_page_generates_pngs_that_carry_their_settings(tmp_path):
    from conceptor.formats.png_info import parse_parameters, read_png_parameters
    from conceptor.ui.page import Page

    f = F.Folders(runs=tmp_path / "runs")
    page = Page(f, Queue(f.runs, ["cpu"]))
    model = page.model_choices()[0]
    assert model == F.BUNDLED
    gallery, info = page.generate(model, "a red circle", "", "euler", 4, 5.0, 7, None, None, 2)
    assert len(gallery) == 2 and info.startswith("a red circle\nSteps: 4, Sampler: Euler")
    prompt, negative, params = parse_parameters(read_png_parameters(gallery[1][0]))
    assert prompt == "a red circle" and params["Seed"] == "8" and params["Model"] == "conceptor-toyworld"
    assert Path(gallery[0][0]).parent.parent == f.images
    _, err = page.generate(model, "a cat <lora:nope:1>", "", "ddim", 4, None, 0, None, None, 1)
    assert err.startswith("error: no LoRA named 'nope'")
    _, err = page.generate(model, "a cat", "", "ddim", 0, None, 0, None, None, 1)
    assert err == "error: --steps must be at least 1, got 0"
    _, err = page.generate("/etc/passwd", "a cat", "", "ddim", 4, None, 0, None, None, 1)
    assert "not in the list" in err


# -- the command ----------------------------------------------------------------------------------------

def test_ui_refuses_other_addresses_without_auth(cli, tmp_path):
    code, _, err = cli("ui", "--host", "0.0.0.0", "--runs-dir", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1 and "--auth" in err
    code, _, err = cli("ui", "--host", "0.0.0.0", "--auth", "nopassword", "--runs-dir", tmp_path / "r")
    assert code == 2 and "user:password" in err
    (tmp_path / "auth.txt").write_text("# logins\nann:secret\n")
    from conceptor.ui.server import check_bind, read_auth

    pairs = read_auth(None, str(tmp_path / "auth.txt"))
    assert pairs == [("ann", "secret")]
    check_bind("0.0.0.0", pairs)  # with a login, other addresses are allowed
    code, _, err = cli("ui", "--models-dir", tmp_path / "nope", "--runs-dir", tmp_path / "r")
    assert code == 2 and "--models-dir" in err and "not a folder" in err
    assert not (tmp_path / "r").exists()


def test_ui_binds_locally_and_asks_for_the_login(tmp_path):
    import httpx

    from conceptor.ui.server import serve

    demo, url, clock = serve(F.Folders(runs=tmp_path / "runs"), port=None, auth=[("ann", "secret")], block=False,
                             devices=["cpu"])
    try:
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "config", timeout=10).status_code == 401  # nothing of the page without the login
        assert httpx.get(url + "gradio_api/info", timeout=10).status_code == 401
        client = httpx.Client(timeout=10)
        assert client.post(url + "login", data={"username": "ann", "password": "wrong"}).status_code == 400
        assert client.post(url + "login", data={"username": "ann", "password": "secret"}).status_code == 200
        assert client.get(url + "config").status_code == 200
    finally:
        clock.stopped.set()
        demo.close()



def test_a_replaced_embedding_file_is_used_not_the_stale_token(tmp_path):
    """Tokens cannot leave a tokenizer: when a token's file changes, the page reloads the model."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    import conceptor
    from conceptor.ui.page import Page

    emb = tmp_path / "embeddings"
    emb.mkdir()
    hidden = conceptor.load(None).components.text_encoder.get_input_embeddings().embedding_dim
    f = F.Folders(runs=tmp_path / "runs", embeddings=emb)
    page = Page(f, Queue(f.runs, ["cpu"]))
    shots = []
    for seed in (1, 2):
        vectors = torch.randn(1, hidden, generator=torch.Generator().manual_seed(seed)) * 2
        save_file({"emb_params": vectors}, str(emb / "shiny.safetensors"))
        os.utime(emb / "shiny.safetensors", ns=(seed * 10**18, seed * 10**18))  # a new mtime even within a tick
        gallery, info = page.generate(F.BUNDLED, "a shiny object", "", "ddim", 4, None, 0, None, None, 1)
        assert "Conceptor embeddings: shiny.safetensors" in info
        fresh = conceptor.load(None, [f"{emb / 'shiny.safetensors'}:shiny"]).generate(
            "a shiny object", steps=4, seed=0, guidance=page.generator._model.default_guidance)[0]
        shots.append(np.asarray(Image.open(gallery[0][0]).convert("RGB")))
        assert np.array_equal(shots[-1], np.asarray(fresh))
    assert not np.array_equal(shots[0], shots[1])


def test_number_boxes_refuse_what_is_not_a_number():
    from conceptor.ui.page import _int, _num

    assert _num(0) is None and _num("") is None and _num(2.5) == 2.5
    assert _int(0, "width") is None and _int(0, "seed") == 0 and _int(None, "seed") is None and _int(7.0) == 7
    for bad, why in [(float("nan"), "finite"), (float("inf"), "finite"), ("x", "must be a number"),
                     (2.5, "whole number")]:
        with pytest.raises(ConceptorError, match=why):
            _int(bad, "steps")


def test_a_taken_port_is_one_line(cli, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, _, err = cli("ui", "--runs-dir", tmp_path / "r", "--port", port)
    assert code == 2 and err == f"error: cannot listen on 127.0.0.1:{port}: the port is in use; pass another --port\n"


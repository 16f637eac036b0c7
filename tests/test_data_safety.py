"""Never lose a user's files: --overwrite removes only what the run's manifest lists, an output may not be or
touch an input, links are never followed, outputs are only regular files conceptor creates, the run lock is
one atomic step, a refused run leaves nothing that needs --overwrite, and damaged saved state is one line."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import subprocess

import pytest

from conceptor.training.manifest import MANIFEST


def ti(tiny, images, out, *extra):
    return ["train", "textual-inversion", "--model", tiny, "--images", images, "--token", "<t>", "--init-token",
            "toy", "--steps", "2", "--checkpoint-every", "1", "--output", out, *extra]


SAMPLES = ("--validation-prompt", "a <t>", "--validation-images", "1", "--config")  # + a file: 2 sampler steps


def with_samples(tmp_path):
    (tmp_path / "fast.yaml").write_text("train:\n  validation_sampling_steps: 2\n")
    return (*SAMPLES, tmp_path / "fast.yaml")


def one_error(code, err, *needles):
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p)
                                         if p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_output_that_is_touches_the_images_is_refused(where, tiny_sd1, concept_images, tmp_path, cli):
    (concept_images / "config.yaml").write_text("method: textual-inversion\n")  # the user's own file
    out = {"is": concept_images, "inside": concept_images / "run", "contains": concept_images.parent}[where]
    before = snapshot(concept_images)
    code, _, err = cli(*ti(tiny_sd1, concept_images, out, "--overwrite"))
    one_error(code, err, "--images", {"is": " is ", "inside": "lies inside", "contains": "contains"}[where])
    assert snapshot(concept_images) == before
    assert not (concept_images / "run").exists()


def test_overwrite_removes_only_the_runs_own_files(tiny_sd1, concept_images, tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli(*ti(tiny_sd1, concept_images, out, *with_samples(tmp_path)))
    assert code == 0, err
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert {"config.yaml", "learned_embeds.safetensors", "metrics.jsonl", "loss.png"} <= set(listed)
    assert any(f.startswith("checkpoints/step-000001/") for f in listed)
    assert all((out / f).is_file() for f in listed)
    (out / "notes.txt").write_text("mine")  # user files beside and inside the run's folders
    (out / "samples" / "favourite.png").write_bytes(b"mine too")
    (out / "learned_embeds-steps-1.safetensors").unlink()  # gone already: skipped, not an error
    code, _, err = cli(*ti(tiny_sd1, concept_images, out, "--overwrite", "--steps", "1", *with_samples(tmp_path)))
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "samples" / "favourite.png").read_bytes() == b"mine too"
    assert not (out / "checkpoints" / "step-000002").exists()  # the old run's
    assert (out / "checkpoints" / "step-000001").is_dir() and (out / "learned_embeds.safetensors").is_file()
    assert "notes.txt" not in json.loads((out / MANIFEST).read_text())["files"]


@pytest.mark.parametrize("link", ["samples", "loss.png"])
def test_a_link_in_an_old_run_refuses_overwrite_before_deleting_anything(link, tiny_sd1, concept_images, tmp_path,
                                                                         cli):
    out = tmp_path / "run"
    code, _, err = cli(*ti(tiny_sd1, concept_images, out, *with_samples(tmp_path)))
    assert code == 0, err
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"user data")
    if link == "samples":
        shutil.rmtree(out / "samples")
        os.symlink(elsewhere, out / "samples")
    else:
        (out / "loss.png").unlink()
        os.symlink(elsewhere / "keep.png", out / "loss.png")
    before, user = snapshot(out), snapshot(elsewhere)
    code, _, err = cli(*ti(tiny_sd1, concept_images, out, "--overwrite"))
    one_error(code, err, "is a link", "nothing was deleted", str(out / link))
    assert snapshot(out) == before and snapshot(elsewhere) == user


def test_resume_on_a_folder_that_is_not_a_run_is_refused(tiny_sd1, concept_images, tmp_path, cli):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"jpeg bytes")
    code, _, err = cli(*ti(tiny_sd1, concept_images, folder, "--resume", "latest"))
    one_error(code, err, "not a conceptor run")
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]  # not turned into a run
    code, _, err = cli(*ti(tiny_sd1, concept_images, folder, "--overwrite"))
    one_error(code, err, "not a conceptor run", "refusing to delete")
    assert (folder / "holiday.jpg").read_bytes() == b"jpeg bytes"


def test_a_refused_run_can_be_retried_without_overwrite(tiny_sd1, concept_images, tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli(*ti(tiny_sd1, concept_images, out, "--mixed-precision", "fp16"))  # refused on the CPU
    one_error(code, err, "bf16")
    assert not out.exists()  # the folder it made is gone again
    out.mkdir()
    code, _, err = cli(*[a if a != "toy" else "   " for a in ti(tiny_sd1, concept_images, out)])  # blank initializer
    one_error(code, err, "initializer")  # refused in set-up, after the folder had a manifest
    assert not (out / "config.yaml").exists()
    code, _, err = cli(*ti(tiny_sd1, concept_images, out))
    assert code == 0, err


def _race(folder, barrier, results):
    from conceptor.errors import ConceptorError
    from conceptor.training.lock import run_lock

    barrier.wait()
    try:
        with run_lock(folder):
            results.put("won")
            import time

            time.sleep(0.3)
    except ConceptorError:
        results.put("refused")


def test_two_runs_started_at_once_never_both_hold_the_lock(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for attempt in range(12):
        folder = tmp_path / f"new-{attempt}"
        folder.mkdir()
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(folder, barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        outcome = sorted(results.get(timeout=5) for _ in procs)
        assert outcome == ["refused", "won"], f"attempt {attempt}: {outcome}"
        assert not (folder / ".conceptor.lock").exists()


def test_outputs_are_never_written_over_fifos_devices_or_links(tmp_path, cli):
    import torch

    from conceptor.formats.embeddings import Embedding, write_embedding

    src = tmp_path / "emb.safetensors"
    write_embedding(Embedding("<t>", torch.randn(1, 32)), src, "diffusers")
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    code, _, err = cli("convert", "embedding", src, fifo, "--to", "kohya")
    one_error(code, err, "FIFO")
    assert fifo.is_fifo()
    target = tmp_path / "user.safetensors"
    target.write_bytes(b"user file")
    link = tmp_path / "link.safetensors"
    os.symlink(target, link)
    code, _, err = cli("convert", "embedding", src, link, "--to", "kohya")
    one_error(code, err, "is a link")
    assert link.is_symlink() and target.read_bytes() == b"user file"
    if os.geteuid() == 0:  # a device node under a name conceptor would write (mknod needs root)
        import stat

        device = tmp_path / "device.safetensors"
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        code, _, err = cli("convert", "embedding", src, device, "--to", "kohya")
        one_error(code, err, "character device")
        assert device.is_char_device()


def test_generate_never_replaces_earlier_images_unless_told(tiny_sd1, tmp_path, cli):
    out = tmp_path / "gen"
    args = ["generate", "--model", tiny_sd1, "--prompt", "a toy", "--steps", "2", "--num-images", "2",
            "--output", out]
    code, _, err = cli(*args)
    assert code == 0, err
    before = snapshot(out)
    code, _, err = cli(*args)
    one_error(code, err, "000-seed0.png", "--overwrite")
    assert snapshot(out) == before
    code, _, err = cli(*args, "--overwrite")
    assert code == 0, err
    # Other seeds into the same folder still replace its generation.json: also refused; with --overwrite only
    # the files of the same names are replaced, the earlier images stay.
    code, _, err = cli(*args[:-2], "--seed", "5", "--num-images", "1", "--output", out)
    one_error(code, err, "generation.json")
    code, _, err = cli(*args[:-2], "--seed", "5", "--num-images", "1", "--output", out, "--overwrite")
    assert code == 0 and (out / "000-seed5.png").is_file() and (out / "001-seed1.png").is_file(), err


@pytest.mark.parametrize("damage", ["config-garbage", "config-list", "state-types", "state-list",
                                    "metrics-garbage"])
def test_damaged_saved_state_is_one_line_or_harmless(damage, tiny_sd1, concept_images, tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli(*ti(tiny_sd1, concept_images, out))
    assert code == 0, err
    state = out / "checkpoints" / "step-000002" / "state.json"
    if damage == "config-garbage":
        (out / "config.yaml").write_bytes(b"\x00\xff: [unclosed")
    elif damage == "config-list":
        (out / "config.yaml").write_text("- 1\n- 2\n")
    elif damage == "state-types":
        state.write_text(json.dumps({"step": "two", "grad_accum": 1.5}))
    elif damage == "state-list":
        state.write_text("[1, 2]")
    else:
        with open(out / "metrics.jsonl", "a") as f:
            f.write('"just a string"\n{"step": "x", "loss": 1}\n[1]\n{"step": 1, "loss": "nan"}\n\x00\x01\n')
    code, _, err = cli(*ti(tiny_sd1, concept_images, out, "--resume", "latest", "--steps", "3"))
    if damage == "metrics-garbage":  # the log is a record, not state: bad rows are dropped, the run goes on
        assert code == 0, err
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [2, 3]  # logged at the last step of each run
        return
    one_error(code, err, "damaged")
    if damage.startswith("config"):
        code, _, err = cli("eval", out, "--num-images", "1", "--steps", "1")
        one_error(code, err, "damaged")


def test_disk_full_inside_safetensors_and_torch_writers_is_one_line(tiny_sd1, concept_images, tmp_path, cli,
                                                                    monkeypatch):
    """The writers' own exceptions (measured on a full tmpfs: safetensors' SafetensorError 'I/O error: No
    space left on device (os error 28)', torch.save's RuntimeError 'unexpected pos 576 vs 534')."""
    from safetensors import SafetensorError

    import conceptor.fileio as fileio
    import conceptor.training.checkpoint as ckpt

    out = tmp_path / "run"
    code, _, err = cli(*ti(tiny_sd1, concept_images, out))
    assert code == 0, err
    before = snapshot(out)

    def safetensors_full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def torch_full(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    for patch in ("safetensors", "torch"):
        with monkeypatch.context() as m:
            if patch == "safetensors":
                m.setattr(ckpt, "save_file", safetensors_full)
            else:
                m.setattr(ckpt.torch, "save", torch_full)
                m.setattr(fileio.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
            code, _, err = cli(*ti(tiny_sd1, concept_images, out, "--resume", "latest", "--steps", "3"))
        one_error(code, err, "No space left on device", "intact")
        after = snapshot(out)  # the earlier checkpoints and outputs, byte for byte; nothing half-written
        for name, content in before.items():
            if name.startswith(("checkpoints", "learned_embeds")):
                assert after[name] == content, name
        assert not (out / "checkpoints" / "step-000003").exists() and not list(out.rglob("*.tmp"))


def test_a_real_full_disk(tmp_path):
    """On a 64 KiB tmpfs when this machine lets us mount one (root in a VM); skipped elsewhere."""
    import torch

    from conceptor.fileio import atomic_path
    from conceptor.formats.embeddings import Embedding, write_embedding

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        (mnt / "kept.txt").write_text("earlier output")
        for writer in ("safetensors", "torch"):
            with pytest.raises(OSError) as e:
                if writer == "safetensors":
                    write_embedding(Embedding("<t>", torch.zeros(200, 768)), mnt / "big.safetensors", "diffusers")
                else:
                    with atomic_path(mnt / "big.pt") as tmp:
                        torch.save({"a": torch.zeros(100_000)}, tmp)
            assert e.value.errno == errno.ENOSPC
            assert sorted(p.name for p in mnt.iterdir()) == ["kept.txt"]  # no partial file, earlier one intact
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # lazy: a writer may hold a handle


def test_demo_overwrite_removes_only_the_demos_files(cli, tmp_path):
    """`conceptor demo --overwrite` once deleted the whole folder if it held a "run" or report.json; now it
    removes what the earlier demo listed and refuses a folder it did not write."""
    photos = tmp_path / "photos"
    (photos / "run").mkdir(parents=True)
    (photos / "run" / "holiday.jpg").write_bytes(b"jpeg")
    code, _, err = cli("demo", "--output", photos, "--overwrite", "--steps", "2")
    one_error(code, err, "refusing to delete")
    assert (photos / "run" / "holiday.jpg").read_bytes() == b"jpeg"
    out = tmp_path / "demo"
    code, _, err = cli("demo", "--output", out, "--steps", "2")
    assert code == 0, err
    (out / "mine.txt").write_text("keep")
    (out / "concept" / "note.txt").write_text("keep too")
    code, _, err = cli("demo", "--output", out, "--overwrite", "--steps", "2")
    assert code == 0, err
    assert (out / "mine.txt").read_text() == "keep" and (out / "concept" / "note.txt").read_text() == "keep too"
    assert json.loads((out / "report.json").read_text())["summary"]["steps"] == 2

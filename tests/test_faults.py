"""Training faults: NaN loss keeps the last good checkpoint, VAE overflow falls back to fp32, a full disk
leaves earlier outputs intact, a shared cache survives concurrent writers."""
from __future__ import annotations

import errno
import threading

import torch
from safetensors.torch import load_file

from conceptor.data.cache import TensorCache, key
from conceptor.methods.denoise import encode_posterior
from conceptor.models.load import load_components


def _ti(tiny, images, out, *extra):
    return ["train", "textual-inversion", "--model", tiny, "--images", images, "--token", "<t>", "--init-token",
            "toy", "--output", out, "--log-every", "5", "--checkpoint-every", "2", *extra]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_sd1, concept_images, tmp_path, cli, monkeypatch):
    from conceptor.methods.textual_inversion import TextualInversion

    real = TextualInversion.loss

    def poisoned(self, micro, g):
        loss = real(self, micro, g)
        return loss * float("nan") if micro >= 2 else loss  # steps 1-2 fine, step 3 goes NaN

    monkeypatch.setattr(TextualInversion, "loss", poisoned)
    code, _, err = cli(*_ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "6"))
    assert code == 2 and "NaN" in err and "--resume latest" in err
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000002"]  # nothing written after the NaN step
    vectors = load_file(str(tmp_path / "run" / "checkpoints" / "step-000002" / "trained.safetensors"))["vectors"]
    assert torch.isfinite(vectors).all()


def test_half_precision_vae_overflow_falls_back_to_fp32(tiny_sd1, caplog):
    c = load_components(str(tiny_sd1))
    vae = c.vae.to(torch.bfloat16)
    real = vae.encoder.forward
    vae.encoder.forward = lambda x: real(x) * (float("inf") if x.dtype != torch.float32 else 1.0)
    with caplog.at_level("WARNING", logger="conceptor"):
        mean, std = encode_posterior(vae, torch.zeros(1, 3, 32, 32))
    assert torch.isfinite(mean).all() and vae.dtype == torch.float32 and "overflowed" in caplog.text


def test_disk_full_keeps_earlier_outputs(tiny_sd1, concept_images, tmp_path, cli, monkeypatch):
    code, _, err = cli(*_ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "2"))
    assert code == 0, err
    before = (tmp_path / "run" / "learned_embeds.safetensors").read_bytes()
    import conceptor.training.checkpoint as ckpt

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    code, _, err = cli(*_ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "4", "--resume", "latest"))
    assert code == 2 and "No space left on device" in err and "intact" in err
    assert (tmp_path / "run" / "learned_embeds.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002"]
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_shared_cache_concurrent_writers(tmp_path):
    cache = TensorCache(tmp_path / "cache")
    k = key("latent", b"same image", "model", (64, 64))
    errors = []

    def writer(seed):
        try:
            for _ in range(20):
                cache.put(k, {"mean": torch.full((4, 8, 8), 1.0)})
                got = TensorCache(tmp_path / "cache").get(k)
                assert got is None or torch.equal(got["mean"], torch.full((4, 8, 8), 1.0))
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert torch.equal(cache.get(k)["mean"], torch.full((4, 8, 8), 1.0))


def test_generation_notices_vae_overflow_instead_of_black_images(tiny_sd1, caplog):
    import numpy as np

    from conceptor import api

    model = api.load(str(tiny_sd1))
    reference = np.asarray(model.generate("a photo of a toy", steps=2)[0])
    vae = model.components.vae.to(torch.bfloat16)
    real = vae.decoder.forward
    vae.decoder.forward = lambda z, *a, **k: real(z, *a, **k) * (float("inf") if z.dtype != torch.float32 else 1.0)
    with caplog.at_level("WARNING", logger="conceptor"):
        image = np.asarray(model.generate("a photo of a toy", steps=2)[0])
    assert "overflowed" in caplog.text and vae.dtype == torch.float32
    assert np.abs(image.astype(int) - reference.astype(int)).max() <= 2  # the fp32 picture, not black


def test_resume_refuses_a_code_pickle(tiny_sd1, concept_images, tmp_path, cli):
    code, _, err = cli(*_ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "2"))
    assert code == 0, err

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')",))

    torch.save({"optimizer": Evil()}, tmp_path / "run" / "checkpoints" / "step-000002" / "optimizer.pt")
    code, _, err = cli(*_ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "4", "--resume", "latest"))
    assert code == 2 and "NOT" in err and "loaded" in err
    assert not (tmp_path / "pwned").exists()


def test_resume_at_the_last_step_rewrites_the_outputs(tiny_sd1, concept_images, tmp_path, cli):
    """A run killed after its last checkpoint but before its outputs were written finishes on --resume."""
    code, _, err = cli(*_ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "2"))
    assert code == 0, err
    want = load_file(str(tmp_path / "run" / "learned_embeds.safetensors"))["<t>"]
    (tmp_path / "run" / "learned_embeds.safetensors").unlink()
    code, _, err = cli(*_ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "2", "--resume", "latest"))
    assert code == 0, err
    assert torch.equal(load_file(str(tmp_path / "run" / "learned_embeds.safetensors"))["<t>"], want)
    code, _, err = cli(*_ti(tiny_sd1, concept_images, tmp_path / "run", "--steps", "1", "--resume", "latest"))
    assert code == 2 and "already at step 2" in err

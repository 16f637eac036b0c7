"""Every row of docs/robustness.md's "input -> behaviour" table for images and captions, tested."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from conceptor.data.images import load_image, read_caption
from conceptor.errors import ConceptorError


def _png(path, im):
    im.save(path)
    return path


def test_truncated_png_and_jpeg_name_the_file(tmp_path):
    for name, fmt in (("a.png", "PNG"), ("b.jpg", "JPEG")):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, fmt)
        (tmp_path / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(ConceptorError, match=f"cannot read image .*{name}"):
            load_image(tmp_path / name)
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ConceptorError, match="c.png"):
        load_image(tmp_path / "c.png")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = _png(tmp_path / "big.png", Image.new("RGB", (300, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)  # 300x300 > 2x the limit
    with pytest.raises(ConceptorError, match="big.png"):
        load_image(path)


def test_tiny_image_is_accepted_and_warned(tmp_path, caplog):
    path = _png(tmp_path / "dot.png", Image.new("RGB", (1, 1), (1, 2, 3)))
    with caplog.at_level(logging.WARNING, logger="conceptor"):
        im = load_image(path)
    assert im.size == (1, 1) and "upscaled" in caplog.text


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    path = _png(tmp_path / "g16.png", Image.fromarray(arr))
    assert Image.open(path).mode.startswith("I")
    assert load_image(path).getpixel((0, 0)) == (128, 128, 128)


def test_palette_png_with_and_without_transparency(tmp_path):
    p = Image.new("P", (4, 4))
    p.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    assert load_image(_png(tmp_path / "p.png", p)).getpixel((0, 0)) == (255, 0, 0)
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    assert load_image(tmp_path / "pt.png").getpixel((0, 0)) == (255, 255, 255)  # composited on white


def test_rgba_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    im.putpixel((1, 1), (10, 20, 30, 255))
    out = load_image(_png(tmp_path / "a.png", im))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (10, 20, 30)


def test_cmyk_jpeg_and_greyscale(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60  # CMYK (0,255,255,0) is red
    assert load_image(_png(tmp_path / "l.png", Image.new("L", (4, 4), 77))).getpixel((0, 0)) == (77, 77, 77)


def test_exif_rotation_is_honoured(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_animated_gif_first_frame_warned(tmp_path, caplog):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, logger="conceptor"):
        im = load_image(tmp_path / "a.gif")
    r, g, b = im.getpixel((0, 0))
    assert r > 200 and b < 50 and "2 frames" in caplog.text


def test_captions_non_utf8_and_empty(tmp_path):
    img = _png(tmp_path / "x.png", Image.new("RGB", (8, 8)))
    (tmp_path / "x.txt").write_bytes(b"caf\xe9 \xff")
    with pytest.raises(ConceptorError, match="not UTF-8"):
        read_caption(img)
    (tmp_path / "x.txt").write_text("   \n")
    assert read_caption(img) is None  # empty caption = no caption (templates apply)

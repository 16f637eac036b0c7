"""``conceptor dataset check`` and data/report.py: the numbers a run will train on, and every setting that would
silently do nothing (nothing to shuffle, no tag to drop, masks that are not there, a trigger no caption holds)
refused in one line that names the subset."""
from __future__ import annotations

import pytest
from PIL import Image

from conceptor.data.dataset import read_training_set
from conceptor.data.report import caption_texts, problems, report, required_tokens


def _image(path, size, alpha=False):
    im = Image.new("RGBA" if alpha else "RGB", size, (200, 60, 40, 128) if alpha else (200, 60, 40))
    im.save(path)


@pytest.fixture()
def folders(tmp_path):
    """img/: two 64x64 and one 96x64, tag captions, one half-white mask; reg/: two uncaptioned 64x64."""
    img, reg = tmp_path / "img", tmp_path / "reg"
    img.mkdir()
    reg.mkdir()
    for name, size, caption in (("a", (64, 64), "sks dog, sitting, grass"), ("b", (64, 64), "sks dog, running"),
                                ("c", (96, 64), "sks dog, sitting, sofa, red collar")):
        _image(img / f"{name}.png", size)
        (img / f"{name}.txt").write_text(caption)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # left half white
    mask.save(img / "a_mask.png")
    for name in ("r0", "r1"):
        _image(reg / f"{name}.png", (64, 64))
    return tmp_path


def _toml(folder, concept="", reg="", dataset=""):
    path = folder / "data.toml"
    path.write_text(f"""
[[datasets]]
resolution = 64
{dataset}
  [[datasets.subsets]]
  image_dir = '{folder / "img"}'
  caption_extension = '.txt'
  class_tokens = 'sks dog'
  num_repeats = 3
  {concept}

  [[datasets.subsets]]
  image_dir = '{folder / "reg"}'
  class_tokens = 'dog'
  is_reg = true
  {reg}
""")
    return path


def _set(folder, **kw):
    ts = read_training_set(_toml(folder, **kw))
    ts.assign_sizes(64, 8)
    return ts


def test_report_numbers_shares_masks_and_buckets(folders):
    ts = _set(folders, concept="masks = true", dataset="enable_bucket = true\nbucket_reso_steps = 16\n"
              "min_bucket_reso = 32\nmax_bucket_reso = 128")
    lines = report(ts)
    text = "\n".join(lines)
    assert "  concept: 3 images x 3 repeats = 9 per epoch, 100.0% of concept examples" in lines
    assert "  reg: 2 images x 1 repeats = 2 per epoch, 100.0% of reg examples" in lines
    assert "  captions: own for all" in lines and "  captions: class_tokens 'dog' for all" in lines
    assert "  caption words: min 3, median 4, max 6" in lines
    assert "  tags: sks dog 3, sitting 2" in text
    assert "  masks: 1 of 3 images, mean 50% white" in lines
    # 64x64 area with 16 px steps: the square bucket, and 96x64 (3:2) lands on the nearest wide one
    bucket_line = lines[-1]
    assert bucket_line.startswith("buckets: 64x64 x4, ") and bucket_line.count(" x") == 2
    wide = ts.items[[it.example.path.name for it in ts.items].index("c.png")].size
    assert wide[0] > wide[1] and f"{wide[0]}x{wide[1]} x1" in bucket_line


def test_shares_of_several_concept_subsets_sum_to_100(folders, tmp_path):
    path = _toml(folders)
    # a second concept subset, 1 repeat of the same 3 images: 9 + 3 entries
    path.write_text(path.read_text() + f"\n  [[datasets.subsets]]\n  image_dir = '{folders / 'img'}'\n"
                                       "  caption_extension = '.txt'\n  class_tokens = 'sks dog'\n")
    ts = read_training_set(path)
    lines = report(ts)
    shares = [float(ln.split(", ")[-1].split("%")[0]) for ln in lines if ln.startswith("  concept:")]
    assert shares == [75.0, 25.0] and sum(shares) == 100.0
    assert not any(ln.startswith("buckets:") for ln in lines)  # sizes not assigned yet


def test_caption_texts_and_required_tokens(folders):
    ts = _set(folders)
    first_reg = next(i for i, it in enumerate(ts.items) if ts.subset_of(i).is_reg)
    assert caption_texts(ts, 0) == ["sks dog, sitting, grass"]
    assert caption_texts(ts, first_reg) == ["dog"]
    # own captions replace class_tokens: its first word must be in them; reg subsets need nothing
    assert required_tokens(ts) == {0: "sks"}
    assert required_tokens(ts, "<tok>") == {0: "<tok>"}


def test_long_captions_are_counted_and_what_is_cut_is_shown(folders):
    def count(text):  # a stand-in tokenizer: one token per word plus start and end
        return len(text.split()) + 2

    ts = _set(folders)
    lines = report(ts, count, 6)
    assert "  caption tokens: min 5, median 6, max 8" in lines
    # "sks dog, sitting, sofa, red collar" is 8 tokens: 4 words fit in 6, "red collar" is cut
    assert '  1 of 3 over 6 tokens, cut off e.g. "red collar"' in lines


def test_clean_dataset_has_no_problems(folders):
    ts = _set(folders, concept="masks = true\nshuffle_caption = true\nkeep_tokens = 1\n"
                               "caption_tag_dropout_rate = 0.1")
    assert problems(ts, required_tokens(ts)) == []


@pytest.mark.parametrize("concept, needle", [
    ("shuffle_caption = true\nkeep_tokens = 3", "shuffle_caption is on but no caption has more than 4 tags"),
    ("caption_tag_dropout_rate = 0.2\nkeep_tokens = 4", "caption_tag_dropout_rate is 0.2 but no caption has more "
                                                        "than 4 tags"),
    ("shuffle_caption = true\ncaption_separator = ';'", "no caption has more than 1 tags split by ';'"),
    ("alpha_mask = true", "alpha_mask is on but no image has an alpha channel"),
    ("", "no caption contains 'zwx': own captions replace class_tokens"),
])
def test_each_setting_that_does_nothing_is_named(folders, concept, needle):
    path = _toml(folders, concept=concept)
    if not concept:  # the trigger word of class_tokens is in none of the images' own captions
        path.write_text(path.read_text().replace("'sks dog'", "'zwx dog'"))
    ts = read_training_set(path)
    bad = problems(ts, required_tokens(ts))
    assert len(bad) == 1 and needle in bad[0]
    assert bad[0].startswith(f"data.toml: datasets[0].subsets[0] ({folders / 'img'}): ")


def test_missing_masks_and_prefix_and_templates(folders, tmp_path):
    (folders / "img" / "a_mask.png").unlink()
    ts = _set(folders, concept="masks = true")
    assert problems(ts, {}) == [f"data.toml: datasets[0].subsets[0] ({folders / 'img'}): masks is on but no image "
                                "has a NAME_mask.png beside it, so every pixel is trained; add the masks or turn "
                                "masks off"]
    # a textual-inversion token missing from the captions, then supplied by caption_prefix
    assert "no caption contains '<tok>': the new token is never trained" in problems(ts, {0: "<tok>"})[1]
    ts = _set(folders, concept="caption_prefix = '<tok>'")
    assert problems(ts, {0: "<tok>"}) == []
    # uncaptioned images without class_tokens are captioned by the templates, which always hold the token
    for p in (folders / "img").glob("*.txt"):
        p.unlink()
    path = _toml(folders)
    path.write_text(path.read_text().replace("class_tokens = 'sks dog'", "token = '<tok>'"))
    ts = read_training_set(path)
    assert required_tokens(ts) == {0: "<tok>"} and problems(ts, required_tokens(ts)) == []
    assert "  captions: the method's templates for all" in report(ts)


def test_alpha_mask_coverage(folders):
    for name in ("a", "b"):
        _image(folders / "img" / f"{name}.png", (64, 64), alpha=True)  # alpha 128 everywhere
    ts = _set(folders, concept="alpha_mask = true")
    assert problems(ts, required_tokens(ts)) == []
    assert "  masks: 2 of 3 images, mean 50% white" in report(ts)


def test_cli_check(cli, folders):
    code, out, err = cli("dataset", "check", _toml(folders), "--resolution", "64")
    assert code == 0 and err == ""
    assert out.splitlines()[-1] == "ok: 5 images in 2 subsets, 9 examples per epoch (and 2 regularisation examples)"
    assert "buckets: 64x64 x5" in out  # no buckets: every image at the dataset's 64x64
    code, out, err = cli("dataset", "check", _toml(folders, concept="shuffle_caption = true\nkeep_tokens = 4"))
    assert code == 2 and len(err.splitlines()) == 1 and "datasets[0].subsets[0]" in err
    assert "shuffle_caption is on" in err and "  concept: 3 images" in out  # the report still printed
    code, _, err = cli("dataset", "check", _toml(folders), "--token", "<tok>")
    assert code == 2 and "no caption contains '<tok>'" in err


def test_cli_bad_input_is_one_line(cli, folders, tmp_path):
    code, out, err = cli("dataset", "check", tmp_path / "nope.toml")
    assert code == 2 and err.startswith("error: ") and "does not exist" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("[[datasets]\n")
    code, _, err = cli("dataset", "check", bad)
    assert code == 2 and "not valid TOML" in err and len(err.splitlines()) == 1
    code, _, err = cli("dataset", "check", _toml(folders), "--model", tmp_path)
    assert code == 2 and "not a local diffusers folder with a tokenizer/" in err


def test_cli_folder_and_model_tokenizer(cli, folders):
    from conceptor.toyworld import MODEL_FOLDER

    code, out, _ = cli("dataset", "check", folders / "img", "--resolution", "64")
    assert code == 0 and "  captions: own for all" in out and out.splitlines()[-1].startswith("ok: 3 images in 1")
    if not (MODEL_FOLDER / "tokenizer").is_dir():
        pytest.skip("the toy model is not bundled in this checkout")
    code, out, _ = cli("dataset", "check", _toml(folders), "--model", MODEL_FOLDER)
    assert code == 0 and "  caption tokens: min " in out

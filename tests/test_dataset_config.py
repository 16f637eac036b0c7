"""kohya's dataset config read as kohya means it: inheritance from [general] and the dataset, kohya's defaults,
and every option conceptor does not implement (or does not know) refused by name, in one line."""
from __future__ import annotations

import pytest

from conceptor.data.dataset_config import read_dataset_config
from conceptor.errors import ConceptorError

KOHYA_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{img}'
  class_tokens = 'hoge girl'
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = '{reg}'
  class_tokens = 'girl'
  is_reg = true
  keep_tokens = 1

[[datasets]]
resolution = [768, 512]
enable_bucket = true

  [[datasets.subsets]]
  image_dir = '{img}'
  class_tokens = 'fuga boy'
"""


@pytest.fixture()
def folders(tmp_path):
    for name in ("img", "reg"):
        (tmp_path / name).mkdir()
    return tmp_path


def _write(folder, text):
    path = folder / "dataset.toml"
    path.write_text(text.format(img=folder / "img", reg=folder / "reg"))
    return path


def test_kohyas_own_example_reads_unchanged(folders):
    a, b = read_dataset_config(_write(folders, KOHYA_EXAMPLE))
    first, reg = a.subsets
    assert a.resolution == (512, 512) and a.batch_size == 4 and not a.enable_bucket
    assert first.class_tokens == "hoge girl" and first.num_repeats == 10 and not first.is_reg
    assert first.keep_tokens == 2 and reg.keep_tokens == 1  # subset over dataset over general
    assert first.shuffle_caption and first.caption_extension == ".txt"  # from [general]
    assert reg.is_reg and reg.image_dir == folders / "reg"
    assert b.resolution == (768, 512) and b.enable_bucket and b.batch_size == 1  # kohya's defaults
    assert b.subsets[0].keep_tokens == 1 and b.subsets[0].num_repeats == 1


@pytest.mark.parametrize("line, needle", [
    ("color_aug = true", "kohya option 'color_aug' is not supported"),
    ("random_crop = true", "kohya option 'random_crop' is not supported"),
    ("num_repeat = 3", "unknown option 'num_repeat'"),
    ("num_repeats = 0", "num_repeats is 0"),
    ("num_repeats = 'ten'", "expected int"),
    ("caption_dropout_rate = 1.5", "between 0 and 1"),
])
def test_options_that_would_do_nothing_or_wrong_are_refused_by_name(folders, line, needle):
    text = KOHYA_EXAMPLE.replace("  num_repeats = 10", "  " + line)
    with pytest.raises(ConceptorError, match=needle) as e:
        read_dataset_config(_write(folders, text))
    assert "datasets[0].subsets[0]" in str(e.value) and "\n" not in str(e.value)


def test_bad_files_and_paths(folders, tmp_path):
    with pytest.raises(ConceptorError, match="does not exist"):
        read_dataset_config(tmp_path / "missing.toml")
    with pytest.raises(ConceptorError, match="not valid TOML"):
        read_dataset_config(_write(folders, "[[datasets]\n"))
    with pytest.raises(ConceptorError, match=r"datasets\[0\].subsets\[1\]: image_dir .* does not exist"):
        read_dataset_config(_write(folders, KOHYA_EXAMPLE.replace("{reg}", "{reg}-gone")))
    with pytest.raises(ConceptorError, match="no \\[\\[datasets\\]\\]"):
        read_dataset_config(_write(folders, "[general]\nflip_aug = true\n"))
    # one token cannot be a concept in one subset and regularisation in another
    with pytest.raises(ConceptorError, match="regularisation subset here but a concept"):
        read_dataset_config(_write(folders, KOHYA_EXAMPLE.replace("class_tokens = 'girl'",
                                                                  "class_tokens = 'hoge girl'")))

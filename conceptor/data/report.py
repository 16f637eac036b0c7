"""What a TrainingSet will train on, in a few lines, and the settings of it that would silently do nothing.

``report`` is what ``conceptor dataset check`` prints and what every training run logs first: per subset its
images, repeats and share of the epoch, where its captions come from, how long they are (and what the text
encoder cuts off), its commonest tags and its mask coverage; then the bucket histogram. ``problems`` finds the
options kohya accepts without complaint but that change nothing for this data (shuffling one-tag captions, masks
that are not there, a trigger word no caption contains), so a run is refused before hours are spent on it.
"""
from __future__ import annotations

import re
import statistics
from collections import Counter

import numpy as np

from .dataset import TrainingSet, read_alpha, tags
from .dataset_config import Subset


def caption_texts(ts: TrainingSet, i: int) -> list[str]:
    """What item ``i`` is captioned with before training-time ops: its own caption, else its subset's
    class_tokens, else nothing (the method's templates caption it)."""
    it, sub = ts.items[i], ts.subset_of(i)
    if it.caption is not None:
        return [it.caption]
    return [sub.class_tokens] if sub.class_tokens else []


def _framed(sub: Subset, text: str) -> str:
    """The caption as realise() builds it before any random op: prefix and suffix are part of what is trained."""
    if sub.caption_prefix:
        text = f"{sub.caption_prefix} {text}"
    if sub.caption_suffix:
        text = f"{text} {sub.caption_suffix}"
    return text


def _texts(ts: TrainingSet, k: int) -> list[str]:
    """Every caption subset ``k`` trains with (framed); template-captioned items contribute none."""
    sub = ts.subsets[k]
    return [_framed(sub, t) for i, it in enumerate(ts.items) if it.subset == k for t in caption_texts(ts, i)]


def required_tokens(ts: TrainingSet, run_token: str | None = None) -> dict[int, str]:
    """Per subset index, a word its captions must contain for the concept to be learned under a name."""
    out = {}
    for k, sub in enumerate(ts.subsets):
        if sub.is_reg:
            continue
        if sub.token or run_token:  # textual inversion: the new token must be in what is trained
            out[k] = sub.token or run_token
        elif sub.class_tokens and sub.class_tokens.split() and any(
                it.caption is not None for it in ts.items if it.subset == k):
            # kohya: an image's own caption replaces class_tokens, so the trigger must be in the captions
            out[k] = sub.class_tokens.split()[0]
    return out


def _contains(text: str, token: str) -> bool:
    # "{}" is textual inversion's placeholder for the token; a word match so "sks" is not found in "asks"
    return "{}" in text or re.search(rf"(?<!\w){re.escape(token)}(?!\w)", text) is not None


def _where(ts: TrainingSet, k: int) -> str:
    """The file and subset a message is about; a shorthand's subset name already holds its flag and source."""
    sub = ts.subsets[k]
    if not ts.datasets[ts.dataset_of[k]].config_given or not ts.source:
        return sub.name
    return f"{ts.source}: {sub.name}"


def _has_alpha(ts: TrainingSet, k: int) -> bool:
    return any(read_alpha(it.example) is not None for it in ts.items if it.subset == k)


def problems(ts: TrainingSet, required: dict[int, str]) -> list[str]:
    """One line per subset setting that would silently do nothing for this data: what, and what to do."""
    out = []
    for k, sub in enumerate(ts.subsets):
        where, texts = _where(ts, k), _texts(ts, k)
        most = max((len(tags(t, sub.caption_separator)) for t in texts), default=0)
        sep, keep = sub.caption_separator, sub.keep_tokens
        if sub.shuffle_caption and most <= keep + 1:
            out.append(f"{where}: shuffle_caption is on but no caption has more than {keep + 1} tags split by "
                       f"{sep!r} (keep_tokens = {keep}), so nothing is shuffled; write captions as tags split by "
                       f"{sep!r} or remove shuffle_caption")
        if sub.caption_tag_dropout_rate > 0 and most <= keep:
            out.append(f"{where}: caption_tag_dropout_rate is {sub.caption_tag_dropout_rate} but no caption has "
                       f"more than {keep} tags split by {sep!r} (keep_tokens = {keep}), so no tag is ever dropped; "
                       "lower keep_tokens, add tags or remove caption_tag_dropout_rate")
        if sub.masks and not any(it.mask is not None for it in ts.items if it.subset == k):
            folder = f" in {sub.mask_dir}" if sub.mask_dir else " beside it"
            out.append(f"{where}: masks is on but no image has a NAME_mask.png{folder}, so every pixel is trained; "
                       "add the masks or turn masks off")
        if sub.alpha_mask and not _has_alpha(ts, k):
            out.append(f"{where}: alpha_mask is on but no image has an alpha channel, so every pixel is trained; "
                       "save the images as PNGs with transparency or remove alpha_mask")
        token = required.get(k)
        if token and texts and not any(_contains(t, token) for t in texts):
            from_class = not sub.token and bool(sub.class_tokens) and token == sub.class_tokens.split()[0]
            why = ("own captions replace class_tokens, so the concept is learned under no token" if from_class
                   else "the new token is never trained")
            out.append(f"{where}: no caption contains {token!r}: {why}; add {token!r} to the captions or set "
                       f"caption_prefix = '{token}'")
    return out


def _num(x: float) -> str:
    return f"{x:g}" if x != int(x) else str(int(x))


def _shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _cut(text: str, count, limit: int) -> str:
    """The words past ``limit`` (approximately: whole words, the longest prefix that fits is kept)."""
    words = text.split()
    lo, hi = 0, len(words)  # the largest j with count(words[:j]) <= limit, by bisection (counts grow with j)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid])) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[lo:])


def _length_lines(texts: list[str], count_tokens, max_tokens: int | None) -> list[str]:
    count = count_tokens or (lambda t: len(t.split()))
    unit = "tokens" if count_tokens else "words"
    lengths = [count(t) for t in texts]
    lines = [f"  caption {unit}: min {min(lengths)}, median {_num(statistics.median(lengths))}, max {max(lengths)}"]
    if max_tokens is not None:
        over = [t for t, n in zip(texts, lengths) if n > max_tokens]
        if over:
            longest = max(over, key=count)
            lines.append(f"  {len(over)} of {len(texts)} over {max_tokens} {unit}, cut off e.g. "
                         f"\"{_shorten(_cut(longest, count, max_tokens))}\"")
    return lines


def _mask_fraction(ts: TrainingSet, i: int) -> float | None:
    """Mean whiteness of item ``i``'s mask, at its training size when it has one, else as the file is."""
    it = ts.items[i]
    if it.size is not None:
        m = ts.mask(i)
        return None if m is None else float(m.mean())
    m = ts.raw_mask(i)
    if m is None:
        return None
    return float(np.asarray(m, dtype=np.float32).mean() / 255.0)


def _subset_lines(ts: TrainingSet, k: int, epoch: list[int], count_tokens, max_tokens) -> list[str]:
    sub = ts.subsets[k]
    idx = [i for i, it in enumerate(ts.items) if it.subset == k]
    n, role = len(idx), "reg" if sub.is_reg else "concept"
    per_epoch = sum(1 for i in epoch if ts.items[i].subset == k)
    share = 100.0 * per_epoch / len(epoch) if epoch else 0.0
    lines = [sub.name,
             f"  {role}: {n} images x {sub.num_repeats} repeats = {per_epoch} per epoch, {share:.1f}% of {role} "
             "examples"]
    own = sum(1 for i in idx if ts.items[i].caption is not None)
    rest = f"class_tokens {sub.class_tokens!r}" if sub.class_tokens else "the method's templates"
    lines.append("  captions: " + ("own for all" if own == n else f"own for {own} of {n}, the rest {rest}"
                                   if own else f"{rest} for all"))
    texts = _texts(ts, k)
    if texts:
        lines += _length_lines(texts, count_tokens, max_tokens)
        split = [[t for t in tags(x, sub.caption_separator) if t] for x in texts]
        if any(len(s) > 1 for s in split):
            freq = Counter(t for s in split for t in set(s))
            lines.append("  tags: " + ", ".join(f"{_shorten(t, 24)} {c}" for t, c in freq.most_common(8)))
    if sub.masks or sub.alpha_mask:
        fractions = [f for f in (_mask_fraction(ts, i) for i in idx) if f is not None]
        mean = f", mean {100 * sum(fractions) / len(fractions):.0f}% white" if fractions else ""
        lines.append(f"  masks: {len(fractions)} of {n} images{mean}")
    return lines


def report(ts: TrainingSet, count_tokens=None, max_tokens: int | None = None) -> list[str]:
    """Human-readable lines about ``ts``. ``count_tokens(text) -> int``: the text encoder's tokenizer (words when
    None); ``max_tokens``: what it keeps, in the same units."""
    epochs = {reg: ts.entries(reg) for reg in (False, True)}
    lines = []
    for k, sub in enumerate(ts.subsets):
        lines += _subset_lines(ts, k, epochs[sub.is_reg], count_tokens, max_tokens)
    if ts.items and all(it.size is not None for it in ts.items):
        sizes = Counter(it.size for it in ts.items).most_common()
        shown = ", ".join(f"{w}x{h} x{c}" for (w, h), c in sizes[:12])
        lines.append(f"buckets: {shown}" + (f", +{len(sizes) - 12} more" if len(sizes) > 12 else ""))
    return lines

"""Tokenizers built in code for the tiny test models: CLIP's BPE (vocab.json + merges.txt) and T5's
SentencePiece-style Unigram (tokenizer.json), each knowing a few words whole and spelling the rest."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

# Words the tiny tokenizer knows as whole tokens; everything else falls back to single characters,
# exactly as CLIP's BPE does for rare words.
DEFAULT_WORDS = (
    "a an the of on in with and photo picture rendering drawing painting cropped close-up bright dark "
    "good nice small large weird clean dirty cool one my art style by object toy cat dog beach red green "
    "blue sks thing"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (the base alphabet of CLIP's BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(folder: str | Path, words: Iterable[str] = DEFAULT_WORDS, max_length: int = 77) -> int:
    """Write a CLIP-format tokenizer (vocab.json + merges.txt) that knows ``words`` as single tokens.

    Returns the vocabulary size. Merges build each word left to right, so BPE recovers it as one token.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    seen = set(vocab)
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            new = parts[0] + parts[1]
            if new not in seen:
                merges.append(f"{parts[0]} {parts[1]}")
                vocab.append(new)
                seen.add(new)
            parts = [new] + parts[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return len(vocab)


def write_t5_tokenizer(folder: str | Path, words: Iterable[str] = DEFAULT_WORDS, max_length: int = 512) -> int:
    """Write a T5-format tokenizer (one ``tokenizer.json``, Unigram over SentencePiece's "▁" word marker, "</s>"
    appended) that knows ``words`` as single pieces and spells anything else with letters, as T5's own does
    with rare words. Returns the vocabulary size. T5's ids: 0 = <pad>, 1 = </s>, 2 = <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = list(dict.fromkeys(words))
    letters = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()<>_/"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in letters if ("\u2581" + c) != c]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5TokenizerFast", "model_max_length": max_length, "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 0}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    return tokenizer.get_vocab_size()

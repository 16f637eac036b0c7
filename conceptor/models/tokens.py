"""New tokens for a frozen text encoder without touching its embedding matrix.

The seeds' recipe resizes the 49k-row embedding matrix, puts all of it in AdamW and copies the old rows
back after every step. Here the new rows live in their own small fp32 parameter: the optimizer, the
gradients and the saved file hold only them, and every original row stays bit-identical by construction.
"""
from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConceptorError


class ExtendedEmbedding(nn.Module):
    """Token embedding = frozen ``base`` rows for ids < ``first_new_id``, trainable ``new`` rows above."""

    def __init__(self, base: nn.Embedding, first_new_id: int, new_vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.new = nn.Parameter(new_vectors.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        """The full matrix, for code (transformers internals, diffusers loaders) that reads ``.weight``."""
        return torch.cat([self.base.weight[: self.first_new_id], self.new.to(self.base.weight.dtype)])

    @property
    def num_embeddings(self) -> int:
        return self.first_new_id + self.new.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.first_new_id
        base = self.base(ids.clamp(max=self.first_new_id - 1))
        if not bool(is_new.any()):
            return base
        new = F.embedding((ids - self.first_new_id).clamp(min=0), self.new).to(base.dtype)
        return torch.where(is_new.unsqueeze(-1), new, base)

    def append(self, vectors: torch.Tensor) -> None:
        """Add more rows (another embedding loaded for generation)."""
        with torch.no_grad():
            self.new = nn.Parameter(torch.cat([self.new.detach(), vectors.detach().float().to(self.new.device)]))


def token_names(token: str, num_vectors: int) -> list[str]:
    """diffusers' names for a multi-vector token: ``tok, tok_1, ..., tok_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_prompt(prompt: str, tokens: dict[str, int]) -> str:
    """Replace every ``tok`` of a multi-vector token by ``tok tok_1 ... tok_{n-1}``."""
    for token, n in tokens.items():
        if n > 1:
            prompt = re.sub(re.escape(token) + r"(?!_\d)", " ".join(token_names(token, n)), prompt)
    return prompt


def check_new_token(tokenizer, token: str) -> None:
    """Refuse a placeholder the tokenizer already knows: training it would shadow that word everywhere."""
    if not token or token.strip() != token or " " in token:
        raise ConceptorError(f"token {token!r} must be one word without spaces, e.g. <cat-toy>")
    if token in tokenizer.get_vocab():
        raise ConceptorError(f"token {token!r} is already in the tokenizer; pick a new one such as "
                             f"<{token.strip('<>')}>")
    pieces = tokenizer.tokenize(token)
    if len(pieces) == 1 and pieces[0] in tokenizer.get_vocab():
        raise ConceptorError(
            f"token {token!r} is already a word the model knows ({pieces[0]!r}); training it would change "
            f"that word in every prompt; use a new token such as <{token.strip('<>')}>")


def initializer_ids(tokenizer, text: str) -> list[int]:
    """The token ids of the init text (a word, its subword pieces, or several words); their rows' mean starts the
    new vectors. Empty text is refused: there would be nothing to average."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ConceptorError(f"initializer {text!r} is empty; pass a word close to the concept, e.g. 'toy' "
                             "(several words start from their mean)")
    return ids


def initial_vector(embeddings: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The fp32 start vector for init ``ids``: one id's row exactly as stored (so a one-token word starts where
    it always did, bit for bit), several ids' rows averaged in fp32 (a half-precision mean would round)."""
    rows = embeddings[ids].detach().float()
    return rows[0] if len(ids) == 1 else rows.mean(0)


def add_tokens(tokenizer, text_encoder, token: str, vectors: torch.Tensor) -> ExtendedEmbedding:
    """Register ``token`` (and ``token_1``...) in tokenizer and text encoder with the given vectors.

    Returns the ExtendedEmbedding now inside ``text_encoder``; its ``new`` parameter ends with these rows.
    """
    vectors = vectors.reshape(-1, vectors.shape[-1])
    embeddings = text_encoder.get_input_embeddings()
    if vectors.shape[-1] != embeddings.embedding_dim:
        raise ConceptorError(f"embedding for {token} is {vectors.shape[-1]} wide but the model's text encoder "
                             f"is {embeddings.embedding_dim} wide; it was trained for another model family")
    names = token_names(token, vectors.shape[0])
    for name in names:
        check_new_token(tokenizer, name)
    first = len(tokenizer)
    added = tokenizer.add_tokens(names, special_tokens=False)
    if added != len(names):
        raise ConceptorError(f"could not add token {token} to the tokenizer")
    ids = tokenizer.convert_tokens_to_ids(names)
    if isinstance(embeddings, ExtendedEmbedding):
        if ids[0] != embeddings.num_embeddings:
            raise ConceptorError(f"token ids out of step while adding {token}; load embeddings before other edits")
        embeddings.append(vectors)
        return embeddings
    if ids != list(range(first, first + len(names))):
        raise ConceptorError(f"tokenizer gave {token} unexpected ids {ids}")
    device = embeddings.weight.device
    extended = ExtendedEmbedding(embeddings, first, vectors.to(device))
    text_encoder.set_input_embeddings(extended)
    return extended

"""Deterministic data order: which examples micro-batch i holds, from (seed, i) alone.

Because the order is a pure function of the step counter, resuming needs no sampler state and lands on
exactly the examples an uninterrupted run would have seen, with or without gradient accumulation.
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, length: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(length, generator=g).tolist())


def batch_indices(micro_index: int, batch_size: int, num_items: int, repeats: int, seed: int) -> list[int]:
    """Item indices (mod ``num_items``) of micro-batch ``micro_index`` in a shuffled stream of epochs.

    One epoch is ``num_items * repeats`` examples (the seeds' convention), reshuffled every epoch.
    """
    epoch_len = num_items * repeats
    out = []
    for k in range(micro_index * batch_size, (micro_index + 1) * batch_size):
        epoch, pos = divmod(k, epoch_len)
        out.append(_epoch_permutation(seed, epoch, epoch_len)[pos] % num_items)
    return out


def step_generator(seed: int, micro_index: int) -> torch.Generator:
    """The RNG for one micro-batch (noise, timesteps, flips, templates), independent of everything before."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + micro_index * 0x85EBCA77) % (2**63 - 1))


class BucketBatches:
    """Micro-batches that never mix buckets (every image in one batch has the same size), in an order that
    is a pure function of (seed, micro-batch index) like ``batch_indices``: each epoch shuffles the images
    inside every bucket, cuts them into batches and shuffles the batches."""

    def __init__(self, bucket_of: list[int], batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed
        self.members: dict[int, list[int]] = {}
        for i, b in enumerate(bucket_of):
            self.members.setdefault(b, []).append(i)
        self.per_epoch = sum(-(-len(m) // batch_size) for m in self.members.values())

    @lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> tuple[tuple[int, ...], ...]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for bucket in sorted(self.members):
            m = self.members[bucket]
            order = [m[j] for j in torch.randperm(len(m), generator=g).tolist()]
            batches += [tuple(order[k:k + self.batch_size]) for k in range(0, len(order), self.batch_size)]
        return tuple(batches[j] for j in torch.randperm(len(batches), generator=g).tolist())

    def __call__(self, micro_index: int) -> list[int]:
        epoch, pos = divmod(micro_index, self.per_epoch)
        return list(self._epoch(epoch)[pos])


class EntryOrder:
    """Micro-batches over one epoch's entries (item indices, repeated by their subsets' ``num_repeats``).

    With one training size it is ``batch_indices``' shuffled stream (a batch may run into the next epoch, as the
    seeds'); with several (buckets), or when asked (``by_bucket``), ``BucketBatches``: a batch never mixes sizes.
    """

    def __init__(self, entries: list[int], size_of: list, batch_size: int, seed: int, by_bucket: bool | None = None):
        self.entries, self.batch_size, self.seed = entries, batch_size, seed
        keys = sorted({size_of[i] for i in entries})
        self.by_bucket = len(keys) > 1 if by_bucket is None else by_bucket
        if self.by_bucket:
            ids = {k: n for n, k in enumerate(keys)}
            self.batches = BucketBatches([ids[size_of[i]] for i in entries], batch_size, seed)
            self.per_epoch = self.batches.per_epoch
        else:
            self.per_epoch = -(-len(entries) // batch_size)

    def __call__(self, micro_index: int) -> list[int]:
        if self.by_bucket:
            return [self.entries[k] for k in self.batches(micro_index)]
        return [self.entries[k] for k in batch_indices(micro_index, self.batch_size, len(self.entries), 1, self.seed)]

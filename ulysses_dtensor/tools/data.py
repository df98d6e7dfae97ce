"""Training data for ``ulysses-dtensor train``: the embedded retrieval task, or a local text file.

Every batch is a pure function of (seed, step): each rank builds the same global batch and keeps
its rows and tokens, and a resumed run (on any (dp, sp) layout) sees exactly the batches the
uninterrupted run would have seen. No data-loader state needs checkpointing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..inputs import IGNORE_INDEX
from ..layout import seq_shard_offsets, seq_shard_sizes


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The generator of one step's batch (``stream`` separates training from evaluation data)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4 + stream)


@dataclass(frozen=True)
class RetrievalTask:
    """Key→value retrieval across the whole sequence.

    A sequence is filler noise with ``records`` record tokens scattered over its first half. A
    record token stands for one (key, value) pair (``keys × values_per_key`` record tokens). The
    last ``queries`` positions hold key tokens; the target at each is the record of that key in
    this sequence. Answering needs attention from the end of the sequence to its first half, i.e.
    across sequence-parallel shards (:meth:`check_layout` asserts it); a model that sees only its
    own shard can do no better than guess the value: chance = 1 / values_per_key.

    Vocabulary: [filler | keys | records].
    """

    filler: int = 64
    keys: int = 32
    values_per_key: int = 16
    records: int = 24
    queries: int = 24

    @property
    def vocab_size(self) -> int:
        return self.filler + self.keys + self.keys * self.values_per_key

    @property
    def chance(self) -> float:
        return 1.0 / self.values_per_key

    def min_seq_len(self) -> int:
        return max(2 * self.records, 2 * self.queries)

    def check_layout(self, seq_len: int, sp: int) -> None:
        """Raise unless every query sits on another sp shard than every record it may ask for."""
        if self.queries > self.records or self.records > self.keys:
            raise ValueError(f"need queries <= records <= keys, got {self.queries}, {self.records}, {self.keys}")
        if seq_len < self.min_seq_len():
            raise ValueError(f"retrieval task needs seq_len >= {self.min_seq_len()}, got {seq_len}")
        if sp == 1:
            return
        starts = seq_shard_offsets(seq_shard_sizes(seq_len, sp))
        shard_of = lambda pos: max(i for i, s in enumerate(starts) if s <= pos)  # noqa: E731
        if shard_of(seq_len // 2 - 1) == shard_of(seq_len - self.queries):
            raise ValueError(
                f"seq_len={seq_len}, sp={sp}: the queries share a shard with the records; "
                "use fewer queries or a longer sequence"
            )

    def batch(self, batch: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets), each (batch, seq_len) int64; targets are -100 except at queries."""
        half, B, M, Q = seq_len // 2, batch, self.records, self.queries
        tokens = torch.randint(0, self.filler, (B, seq_len), generator=gen)
        keys = torch.rand(B, self.keys, generator=gen).argsort(1)[:, :M]
        values = torch.randint(0, self.values_per_key, (B, M), generator=gen)
        slots = torch.rand(B, half, generator=gen).argsort(1)[:, :M]
        record_ids = self.filler + self.keys + keys * self.values_per_key + values
        tokens.scatter_(1, slots, record_ids)
        asked = torch.rand(B, M, generator=gen).argsort(1)[:, :Q]
        tokens[:, seq_len - Q :] = self.filler + keys.gather(1, asked)
        targets = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
        targets[:, seq_len - Q :] = record_ids.gather(1, asked)
        return tokens, targets


@dataclass(frozen=True)
class TextTask:
    """Next-byte prediction on windows of a local text: a ``.txt`` file, or a directory saved by
    Hugging Face ``datasets`` (``save_to_disk``) with a ``text`` column. Vocabulary: 256 bytes."""

    data: torch.Tensor  # uint8, the whole corpus

    vocab_size: int = 256
    chance: float = 1.0 / 256

    @classmethod
    def load(cls, path: str) -> "TextTask":
        if os.path.isdir(path):
            import datasets  # optional: pip install datasets

            text = "\n".join(datasets.load_from_disk(path)["text"])
        elif os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        else:
            raise FileNotFoundError(f"--text {path!r}: no such file or directory")
        data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
        return cls(data=data)

    def check_layout(self, seq_len: int, sp: int) -> None:
        if self.data.numel() < seq_len + 1:
            raise ValueError(f"text has {self.data.numel()} bytes, fewer than seq_len + 1 = {seq_len + 1}")

    def batch(self, batch: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.data.numel() - seq_len, (batch,), generator=gen)
        windows = torch.stack([self.data[s : s + seq_len + 1] for s in starts.tolist()]).long()
        return windows[:, :-1], windows[:, 1:]

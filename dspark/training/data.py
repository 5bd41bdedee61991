"""Token streams and the Lightning data module for language-model training on the stdlib corpus."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dspark.data.corpus import Document, build_corpus

DOMAINS = ("code", "prose")


def token_stream(documents: list[Document], tokenizer) -> torch.Tensor:
    """All documents tokenised and concatenated, each followed by EOS: ``[N]`` int64."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in documents:
        ids.extend(tokenizer(doc.text)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """``[V]`` bytes of text each token stands for (byte-level BPE: one byte per symbol; specials 0)."""
    special = set(tokenizer.all_special_ids)
    vocab = len(tokenizer)
    return torch.tensor([0 if i in special else len(tokenizer.convert_ids_to_tokens(i)) for i in range(vocab)])


class RandomBlocks(Dataset):
    """Blocks of ``block`` tokens at random offsets: sample ``i`` depends only on (seed, i), so
    training is reproducible, and a resumed run starts at sample ``first`` (no sample is repeated)."""

    def __init__(self, stream: torch.Tensor, block: int, length: int, seed: int, first: int = 0):
        if len(stream) <= block:
            raise ValueError(f"token stream of {len(stream)} tokens is too short for blocks of {block}")
        self.stream, self.block, self.length, self.seed, self.first = stream, block, length, seed, first

    def __len__(self) -> int:
        return max(0, self.length - self.first)

    def __getitem__(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.first + index)
        start = int(torch.randint(0, len(self.stream) - self.block, (1,), generator=g))
        return self.stream[start: start + self.block]


class SequentialBlocks(Dataset):
    """Consecutive non-overlapping blocks covering a stream (held-out evaluation); the tail that
    does not fill a block is dropped. ``max_blocks`` caps the count (evenly spaced)."""

    def __init__(self, stream: torch.Tensor, block: int, max_blocks: int | None = None):
        count = (len(stream) - 1) // (block - 1)
        starts = [i * (block - 1) for i in range(count)]
        if max_blocks is not None and count > max_blocks:
            step = count / max_blocks
            starts = [starts[int(i * step)] for i in range(max_blocks)]
        self.stream, self.block, self.starts = stream, block, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> torch.Tensor:
        start = self.starts[index]
        return self.stream[start: start + self.block]


class CorpusDataModule(L.LightningDataModule):
    """Train on the train split (both domains mixed); validate and test per domain.

    Args:
        tokenizer: the corpus tokenizer.
        seq_len: tokens per training sequence (blocks are ``seq_len + 1`` for the shifted targets).
        batch_size, num_samples: training batch size and samples per epoch.
        seed: sampling seed. corpus: keyword arguments of :func:`~dspark.data.corpus.build_corpus`.
        max_eval_blocks: cap on evaluation blocks per domain (``None`` = the whole split).
        documents: a prepared corpus (tests), instead of building it.
    """

    def __init__(self, tokenizer, *, seq_len: int, batch_size: int, num_samples: int, seed: int = 0,
                 corpus: dict | None = None, max_eval_blocks: int | None = None, documents: list[Document] | None = None):
        super().__init__()
        self.tokenizer, self.seq_len, self.batch_size = tokenizer, seq_len, batch_size
        self.num_samples, self.seed, self.corpus = num_samples, seed, corpus or {}
        self.max_eval_blocks, self.documents = max_eval_blocks, documents
        self.streams: dict[str, torch.Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.streams:
            return
        documents = self.documents if self.documents is not None else build_corpus(**self.corpus)
        self.streams["train"] = token_stream([d for d in documents if d.split == "train"], self.tokenizer)
        for split in ("validation", "test"):
            for domain in DOMAINS:
                self.streams[f"{split}/{domain}"] = token_stream(
                    [d for d in documents if d.split == split and d.domain == domain], self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        done = self.trainer.global_step * self.batch_size if self.trainer is not None else 0  # resumed runs
        blocks = RandomBlocks(self.streams["train"], self.seq_len + 1, self.num_samples, self.seed, first=done)
        return DataLoader(blocks, batch_size=self.batch_size, shuffle=False, drop_last=True)

    def _eval(self, split: str) -> list[DataLoader]:
        return [DataLoader(SequentialBlocks(self.streams[f"{split}/{d}"], self.seq_len + 1, self.max_eval_blocks),
                           batch_size=self.batch_size) for d in DOMAINS]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval("validation")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval("test")

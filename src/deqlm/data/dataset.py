"""What the trainer and the evaluator hold: ``build_dataset(cfg.data)`` -> an ``LMDataset`` or a
``CopyMemoryDataset``, each handing out ordered batches as torch tensors.

Kept apart from corpus.py (files, token caches) so that preparing or inspecting a corpus does not load torch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from deqlm.choices import DatasetName, check_registry
from deqlm.config import DataConfig
from deqlm.data.copy_memory import N_SYMBOLS, make_copy_memory
from deqlm.data.corpus import CORPORA, SPLITS, TokenizedCorpus, corpus_summary, open_corpus
from deqlm.data.errors import DataError
from deqlm.data.iterators import LMOrderedIterator, ShuffledIterator
from deqlm.data.synthetic import read_entropy_rate


def build_dataset(cfg: DataConfig) -> LMDataset | CopyMemoryDataset:
    """The dataset named by ``cfg.dataset`` (one of deqlm.choices.DatasetName), caches built on first use."""
    return BUILDERS[cfg.dataset](cfg)


def _copy_memory(cfg: DataConfig) -> CopyMemoryDataset:
    return CopyMemoryDataset(T=cfg.copy_T, n_train=cfg.copy_n_train, n_test=cfg.copy_n_test,
                             n_valid=cfg.copy_n_valid, seed=cfg.copy_seed)


def _text_corpus(cfg: DataConfig) -> LMDataset:
    name, corpus = open_corpus(cfg)
    entropy = read_entropy_rate(corpus.corpus_dir) if cfg.dataset == "synthetic" else None
    return LMDataset(name, corpus, entropy_rate=entropy)


# data.dataset -> builder: the corpora scripts/prepare_data.py downloads, the embedded synthetic language, and
# copy memory (generated from its seed)
BUILDERS = {name: _text_corpus for name in (*CORPORA, "synthetic")} | {"copy": _copy_memory}
check_registry(BUILDERS, DatasetName, "data.dataset")


class LMDataset:
    """A language-modelling corpus: vocabulary, split sizes and ordered batches (see iterators.py)."""

    carry_mems = True

    def __init__(self, name: str, corpus: TokenizedCorpus, entropy_rate: float | None = None):
        self.name = name
        self.corpus = corpus
        self.corpus_dir = corpus.corpus_dir
        self.vocab = corpus.vocab
        self.tokenizer = corpus.vocab.kind
        self.vocab_size = corpus.vocab.vocab_size
        self.n_classes = self.vocab_size
        self.vocab_hash = corpus.vocab.hash
        self.entropy_rate = entropy_rate  # nats/token incl. <eos> of the generating process (synthetic only)

    def _check_split(self, split: str) -> str:
        if split not in SPLITS:
            raise DataError(f"split={split!r} is not one of {', '.join(SPLITS)}")
        return split

    def ids(self, split: str) -> np.ndarray:
        return self.corpus.ids[self._check_split(split)]

    def split_tokens(self, split: str) -> int:
        """Tokens of the split in this tokenizer's units (words + one <eos> per line for the word vocab)."""
        return int(self.corpus.stats[self._check_split(split)]["tokens"])

    def split_words(self, split: str) -> int:
        """Words incl. one <eos> per line, whatever the tokenizer: the denominator of word-level ppl."""
        return int(self.corpus.stats[self._check_split(split)]["words"])

    def split_oov(self, split: str) -> int:
        """Words of the split outside the train vocabulary (mapped to <unk>)."""
        return int(self.corpus.stats[self._check_split(split)]["oov"])

    def train_iterator(self, batch_size: int, tgt_len: int, rank: int = 0,
                       world_size: int = 1) -> LMOrderedIterator:
        """Endless ordered training batches; ``batch_size`` is global, a rank gets batch_size/world_size."""
        return LMOrderedIterator(self.ids("train"), batch_size, tgt_len, rank, world_size, loop=True)

    def eval_batches(self, split: str, batch_size: int, tgt_len: int) -> Iterator:
        """One ordered pass over a whole split, last short segment kept."""
        return LMOrderedIterator(self.ids(split), batch_size, tgt_len, loop=False)

    def check_vocab_hash(self, expected: str) -> None:
        """Refuse a checkpoint whose vocabulary differs from this corpus's."""
        if expected != self.vocab_hash:
            raise DataError(f"vocabulary mismatch: checkpoint has {expected}, corpus {self.corpus_dir} has "
                            f"{self.vocab_hash} (tokenizer {self.tokenizer})")

    def summary(self) -> dict:
        """The figures ``python -m deqlm.data inspect`` prints."""
        return corpus_summary(self.name, self.corpus)


class CopyMemoryDataset:
    """Copy memory as a Dataset: inputs 0..9 (vocab_size 10), 10 classes, no memory across batches."""

    name = "copy"
    carry_mems = False
    vocab_size = N_SYMBOLS
    n_classes = N_SYMBOLS
    entropy_rate = None
    corpus_dir = None
    tokenizer = "copy"

    def __init__(self, T: int = 400, n_train: int = 20000, n_test: int = 2000, n_valid: int = 2000,
                 seed: int = 1111):
        self.T, self.seed = T, seed
        self.train_x_NL, self.train_y_NL = make_copy_memory(n_train, T, seed)
        # separate streams: the test set does not change when n_train does, and validation (which picks the
        # best checkpoint) never sees it (the paper's task has train and test only)
        self.test_x_NL, self.test_y_NL = make_copy_memory(n_test, T, seed + 1_000_003)
        self.valid_x_NL, self.valid_y_NL = make_copy_memory(n_valid, T, seed + 2_000_003)
        self.vocab_hash = f"copy-T{T}"

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split == "train":
            return self.train_x_NL, self.train_y_NL
        if split == "valid":
            return self.valid_x_NL, self.valid_y_NL
        if split == "test":
            return self.test_x_NL, self.test_y_NL
        raise DataError(f"split={split!r} is not one of train, valid, test")

    def split_tokens(self, split: str) -> int:
        return int(self._split(split)[1].size)

    def split_words(self, split: str) -> int:
        return self.split_tokens(split)

    def train_iterator(self, batch_size: int, tgt_len: int = 0, rank: int = 0, world_size: int = 1):
        """``tgt_len`` is ignored: a batch holds whole sequences of length T+20."""
        return ShuffledIterator(self.train_x_NL, self.train_y_NL, batch_size, self.seed, rank, world_size)

    def eval_batches(self, split: str, batch_size: int, tgt_len: int = 0) -> Iterator:
        """The whole split in order, in batches of whole sequences (the last one may be smaller)."""
        x_NL, y_NL = self._split(split)
        if batch_size <= 0:
            raise DataError(f"batch_size={batch_size} must be positive")
        rows = [slice(start, start + batch_size) for start in range(0, len(x_NL), batch_size)]
        return ((torch.from_numpy(x_NL[r]), torch.from_numpy(y_NL[r])) for r in rows)

    def check_vocab_hash(self, expected: str) -> None:
        if expected != self.vocab_hash:
            raise DataError(f"task mismatch: checkpoint has {expected}, dataset is {self.vocab_hash}")

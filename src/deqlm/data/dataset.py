"""What the trainer and the evaluator hold: ``build_dataset(cfg.data)`` -> an ``LMDataset`` or a
``CopyMemoryDataset``, each handing out ordered batches as torch tensors.

Kept apart from corpus.py (files, token caches) so that preparing or inspecting a corpus does not load torch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from deqlm.choices import DatasetName, check_registry
from deqlm.config import DataConfig
from deqlm.data.copy_memory import CopyMemoryDataset
from deqlm.data.corpus import CORPORA, SPLITS, WIKITEXT_FILES, TokenizedCorpus, load_corpus, locate_corpus
from deqlm.data.errors import DataError
from deqlm.data.iterators import LMOrderedIterator
from deqlm.data.synthetic import ensure_synthetic, read_entropy_rate


def build_dataset(cfg: DataConfig) -> LMDataset | CopyMemoryDataset:
    """The dataset named by ``cfg.dataset`` (one of deqlm.choices.DatasetName), caches built on first use."""
    return BUILDERS[cfg.dataset](cfg)


def _copy_memory(cfg: DataConfig) -> CopyMemoryDataset:
    return CopyMemoryDataset(T=cfg.copy_T, n_train=cfg.copy_n_train, n_test=cfg.copy_n_test,
                             n_valid=cfg.copy_n_valid, seed=cfg.copy_seed)


def _synthetic(cfg: DataConfig) -> LMDataset:
    corpus_dir = ensure_synthetic(cfg.data_dir, cfg.synth_seed, cfg.synth_vocab, cfg.synth_train_tokens)
    corpus = load_corpus(corpus_dir, WIKITEXT_FILES, cfg.tokenizer, cfg.sp_vocab_size)
    return LMDataset(f"synthetic-{cfg.synth_seed}", corpus, entropy_rate=read_entropy_rate(corpus_dir))


def _downloaded_corpus(cfg: DataConfig) -> LMDataset:
    spec = CORPORA[cfg.dataset]
    corpus = load_corpus(locate_corpus(cfg.data_dir, spec), spec.files, cfg.tokenizer, cfg.sp_vocab_size)
    return LMDataset(cfg.dataset, corpus)


# data.dataset -> builder: the corpora scripts/prepare_data.py downloads, the embedded synthetic language, and
# copy memory (generated from its seed)
BUILDERS = {name: _downloaded_corpus for name in CORPORA} | {"synthetic": _synthetic, "copy": _copy_memory}
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
        return {"dataset": self.name, "vocab_size": self.vocab_size,
                **{f"{s}_tokens": self.split_tokens(s) for s in SPLITS},
                "oov_valid": self.split_oov("valid"), "oov_test": self.split_oov("test")}

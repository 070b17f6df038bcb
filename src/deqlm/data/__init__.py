"""deqlm.data: corpora, vocabularies, token caches, ordered LM batches, copy memory, the synthetic language.

``build_dataset(cfg.data)`` is the one entry point the trainer and evaluator use; only ``deqlm.data.prepare``
(``scripts/prepare_data.py``) touches the network.
"""

from __future__ import annotations

from deqlm.data.copy_memory import CopyMemoryDataset
from deqlm.data.corpus import CORPORA, SPLITS, WIKITEXT_FILES, LMDataset, load_corpus, locate_corpus
from deqlm.data.errors import DataError
from deqlm.data.iterators import LMOrderedIterator
from deqlm.data.synthetic import ensure_synthetic, read_entropy_rate

__all__ = ["build_dataset", "DataError", "LMDataset", "CopyMemoryDataset", "LMOrderedIterator", "SPLITS"]

DATASETS = ("ptb", "wt103", "wt2", "synthetic", "copy")


def build_dataset(cfg) -> LMDataset | CopyMemoryDataset:
    """The dataset named by ``cfg.dataset`` (a ``deqlm.config.DataConfig``), caches built on first use."""
    if cfg.dataset == "copy":
        return CopyMemoryDataset(T=cfg.copy_T, n_train=cfg.copy_n_train, n_test=cfg.copy_n_test,
                                 n_valid=cfg.copy_n_valid, seed=cfg.copy_seed)
    if cfg.dataset == "synthetic":
        corpus_dir = ensure_synthetic(cfg.data_dir, cfg.synth_seed, cfg.synth_vocab, cfg.synth_train_tokens)
        corpus = load_corpus(corpus_dir, WIKITEXT_FILES, cfg.tokenizer, cfg.sp_vocab_size)
        return LMDataset(f"synthetic-{cfg.synth_seed}", corpus, entropy_rate=read_entropy_rate(corpus_dir))
    if cfg.dataset not in CORPORA:
        raise DataError(f"data.dataset={cfg.dataset!r} is not one of {', '.join(DATASETS)}")
    spec = CORPORA[cfg.dataset]
    corpus = load_corpus(locate_corpus(cfg.data_dir, spec), spec.files, cfg.tokenizer, cfg.sp_vocab_size)
    return LMDataset(cfg.dataset, corpus)

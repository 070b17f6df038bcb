"""deqlm.data: corpora, vocabularies, token caches, ordered LM batches, copy memory, the synthetic language.

``build_dataset(cfg.data)`` is the one entry point the trainer and evaluator use; only ``deqlm.data.prepare``
(``scripts/prepare_data.py``) touches the network.
"""

from __future__ import annotations

import importlib

from deqlm.choices import DatasetName, values
from deqlm.data.corpus import SPLITS
from deqlm.data.errors import DataError

__all__ = ["build_dataset", "DataError", "LMDataset", "CopyMemoryDataset", "LMOrderedIterator", "SPLITS",
           "DATASETS"]

DATASETS = values(DatasetName)  # what data.dataset accepts; dataset.py checks its builders hold these names

# The datasets hand out torch tensors; this package is imported before `python -m deqlm.data` and
# scripts/prepare_data.py parse their arguments, so their names load on first use (PEP 562) and `--help`
# answers without torch.
_LAZY = {"build_dataset": "dataset", "LMDataset": "dataset", "CopyMemoryDataset": "copy_memory",
         "LMOrderedIterator": "iterators"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"deqlm.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'deqlm.data' has no attribute {name!r}")

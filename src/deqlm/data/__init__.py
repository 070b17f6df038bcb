"""deqlm.data: corpora, vocabularies, token caches, ordered LM batches, copy memory, the synthetic language.

``deqlm.data.dataset.build_dataset(cfg.data)`` is the one entry point the trainer and evaluator use (the
datasets hand out torch tensors; ``corpus.py``, ``tokenizers.py``, ``synthetic.py`` and ``prepare.py`` do not
load torch); only ``deqlm.data.prepare`` (``scripts/prepare_data.py``) touches the network. Import names from
their modules: this package re-exports nothing, so importing it loads nothing.
"""

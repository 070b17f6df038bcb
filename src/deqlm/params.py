"""Parameter counts of an experiment without data or memory: `python -m deqlm.params CONFIG [key=value ...]`.

Prints one JSON line {"name", "params_total", "params_nonembedding", "vocab_size"}. The model is built on the
meta device (no storage is allocated, so a 1e8-parameter model counts in a second); the vocabulary size comes
from the table below, i.e. the published sizes of each corpus, so no corpus has to be downloaded.
Non-embedding = everything except the input embedding and softmax head (word tables, adaptive projections,
cluster weights, output biases), the Transformer-XL convention.
"""

from __future__ import annotations

import json
import sys

from deqlm.config import ConfigError, load_config
from deqlm.data.corpus import CORPORA
from deqlm.infra.exits import BAD_INPUT, OK, error

USAGE = "usage: python -m deqlm.params CONFIG [key=value ...]"

# word-level vocabulary sizes (docs/paper.md §4); copy memory has 10 input symbols
VOCAB_SIZES = {"ptb": 10000, "wt103": 267735, "wt2": 33278, "copy": 10}


def vocab_size_of(cfg_data) -> int:
    if cfg_data.tokenizer == "sentencepiece" and cfg_data.dataset in CORPORA:
        return int(cfg_data.sp_vocab_size)
    if cfg_data.dataset == "synthetic":
        return int(cfg_data.synth_vocab) + 1  # + <eos>
    return VOCAB_SIZES[cfg_data.dataset]


def count_experiment(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    cfg = load_config(path, overrides)
    vocab = vocab_size_of(cfg.data)
    # the model's modules load torch: imported only now, so that `--help` and a bad config answer without it
    from deqlm.models.build import count_on_meta

    return {"name": cfg.name, **count_on_meta(cfg.model, cfg.deq, vocab), "vocab_size": vocab}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return OK
    if not argv:
        return error(f"no experiment given ({USAGE[7:]})", BAD_INPUT)
    try:
        print(json.dumps(count_experiment(argv[0], argv[1:])))
    except (ConfigError, ValueError) as exc:
        return error(str(exc), BAD_INPUT)
    return OK


if __name__ == "__main__":
    sys.exit(main())

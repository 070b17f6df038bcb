"""``python -m deqlm.data inspect --dataset NAME [--data-dir DIR] [--tokenizer word] --json``."""

from __future__ import annotations

import argparse
import json
import sys

from deqlm.choices import DatasetName, Tokenizer, values
from deqlm.config import DataConfig
from deqlm.data.copy_memory import copy_memory_summary
from deqlm.data.corpus import corpus_summary, open_corpus
from deqlm.data.errors import DataError
from deqlm.infra.exits import BAD_INPUT, OK, error


def describe(cfg: DataConfig) -> dict:
    """Vocabulary, split sizes and OOV counts, from the corpus cache or the task's definition (no torch)."""
    if cfg.dataset == "copy":
        return copy_memory_summary(cfg.copy_T, cfg.copy_n_train, cfg.copy_n_valid, cfg.copy_n_test)
    return corpus_summary(*open_corpus(cfg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deqlm.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="vocabulary size, split token counts and OOV counts of a corpus")
    ins.add_argument("--dataset", required=True, choices=values(DatasetName))
    ins.add_argument("--data-dir", default="data")
    ins.add_argument("--tokenizer", default="word", choices=values(Tokenizer))
    ins.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    args = parser.parse_args(argv)
    try:
        info = describe(DataConfig(dataset=args.dataset, data_dir=args.data_dir, tokenizer=args.tokenizer))
    except DataError as exc:
        return error(str(exc), BAD_INPUT)
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>14}  {value:,}" if isinstance(value, int) else f"{key:>14}  {value}")
    return OK


if __name__ == "__main__":
    sys.exit(main())

"""Corpus preparation: the only code in deqlm that touches the network.

``python scripts/prepare_data.py --dataset {wt103,wt2,ptb} [--data-dir data] [--source-dir DIR] [--force]``
writes the original file layout under ``<data-dir>/<folder>/`` plus a ``SOURCE.json`` (origin, and per
file: bytes, sha256, lines, words, tokens = words + one <eos> per line). Files are written to a temporary
folder that is renamed into place at the end, so an interrupted download never leaves a corpus behind.

Hub sources (Hugging Face, parquet, fetched with ``huggingface_hub.hf_hub_download``, the downloader
``datasets`` itself uses):

* WikiText: ``Salesforce/wikitext``, configs ``wikitext-103-v1`` / ``wikitext-2-v1`` (the tokenized variants
  the paper used). One row per original line with its leading space and trailing newline; the original blank
  lines (" \\n") are stored as "" and are restored.
* PTB: ``ptb-text-only/ptb_text_only`` at revision ``refs/convert/parquet``, files
  ``penn_treebank/{split}/0000.parquet`` (the loading-script dataset no longer loads in current ``datasets``).
  Rows are sentences; Mikolov's line format " w1 w2 ... \\n" is restored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from deqlm.data.corpus import CORPORA, SPLITS
from deqlm.data.errors import DataError
from deqlm.data.synthetic import ensure_synthetic
from deqlm.infra.exits import BAD_INPUT, OK, describe, error

HUB = {  # dataset -> (repo id, config or path template, revision)
    "wt103": ("Salesforce/wikitext", "wikitext-103-v1", None),
    "wt2": ("Salesforce/wikitext", "wikitext-2-v1", None),
    "ptb": ("ptb-text-only/ptb_text_only", "penn_treebank", "refs/convert/parquet"),
}
HUB_SPLIT = {"train": "train", "valid": "validation", "test": "test"}
# Published token counts (words + one <eos> per line; docs/paper.md §4), checked after preparation.
KNOWN_TOKENS = {
    "ptb": {"train": 929_589, "valid": 73_760, "test": 82_430},
    "wt103": {"train": 103_227_021, "valid": 217_646, "test": 245_569},
    "wt2": {"train": 2_088_628, "valid": 217_646, "test": 245_569},
}
WIKITEXT_BLANK = " \n"  # a blank line of the original wiki.*.tokens files


def download_parquet(dataset: str, split: str) -> list[Path]:
    """Fetch the parquet file(s) of one split into the Hugging Face cache; network errors raise."""
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its retry warnings would bury our one-line error
    if not constants.HF_HUB_OFFLINE:  # fail in seconds, not after the client's ~30 s of retries
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        with socket.create_connection((host, 443), timeout=10):
            pass
    repo, config, revision = HUB[dataset]
    if dataset == "ptb":
        names = [f"{config}/{HUB_SPLIT[split]}/0000.parquet"]
    else:
        files = HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
        stem = f"{config}/{HUB_SPLIT[split]}-"
        names = sorted(f for f in files if f.startswith(stem) and f.endswith(".parquet"))
        if not names:
            raise FileNotFoundError(f"no {config}/{HUB_SPLIT[split]}-*.parquet in {repo}")
    return [Path(hf_hub_download(repo, name, repo_type="dataset", revision=revision)) for name in names]


def parquet_lines(dataset: str, paths: list[Path]) -> Iterator[str]:
    """The original lines of a split, rebuilt from its parquet rows (streamed one record batch at a time)."""
    import pyarrow.parquet as pq

    column = "sentence" if dataset == "ptb" else "text"
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=65536):
            for row in batch.column(0).to_pylist():
                if dataset == "ptb":
                    yield f" {row} \n"
                elif row == "":
                    yield WIKITEXT_BLANK
                else:
                    yield row if row.endswith("\n") else row + "\n"


def file_record(path: Path) -> dict:
    """bytes, sha256, lines, words and tokens (words + one <eos> per line) of a corpus file, in one pass."""
    h = hashlib.sha256()
    n_bytes = n_lines = n_words = 0
    with open(path, "rb") as fh:
        for raw in fh:
            h.update(raw)
            n_bytes += len(raw)
            n_lines += 1
            try:
                n_words += len(raw.decode("utf-8").split())
            except UnicodeDecodeError:
                raise DataError(f"{path}: line {n_lines} is not UTF-8 text") from None
    return {"bytes": n_bytes, "sha256": h.hexdigest(), "lines": n_lines, "words": n_words,
            "tokens": n_words + n_lines}


def _fill_from_source(dataset: str, source_dir: Path, tmp: Path) -> str:
    names = CORPORA[dataset].files
    missing = [names[s] for s in SPLITS if not (source_dir / names[s]).is_file()]
    if missing:
        raise DataError(f"--source-dir {source_dir} lacks {', '.join(missing)} "
                        f"(needs {', '.join(names.values())})")
    for split in SPLITS:
        src = source_dir / names[split]
        if src.stat().st_size == 0:
            raise DataError(f"empty {split} file {src}")
        shutil.copyfile(src, tmp / names[split])
    return f"source-dir:{source_dir.resolve()}"


def _fill_from_hub(dataset: str, tmp: Path) -> str:
    repo, config, revision = HUB[dataset]
    names = CORPORA[dataset].files
    for split in SPLITS:
        try:
            paths = download_parquet(dataset, split)
        except Exception as exc:  # the hub client raises many types (HTTP, offline, DNS, OSError)
            raise DataError(f"cannot download {repo} ({config}) from the Hugging Face hub ({describe(exc)}); "
                            f"without network pass --source-dir DIR holding "
                            f"{', '.join(names.values())}") from None
        with open(tmp / names[split], "w", encoding="utf-8", newline="\n") as fh:
            fh.writelines(parquet_lines(dataset, paths))
    return f"hub:{repo}/{config}" + (f"@{revision}" if revision else "")


def prepare(dataset: str, data_dir: str | os.PathLike = "data", source_dir: str | os.PathLike | None = None,
            force: bool = False, log=print) -> Path:
    """Write ``<data_dir>/<folder>/`` with the three split files and SOURCE.json; returns that folder."""
    if dataset not in CORPORA:
        raise DataError(f"--dataset {dataset!r} is not one of {', '.join(CORPORA)}, synthetic")
    spec = CORPORA[dataset]
    out = Path(data_dir) / spec.folder
    if (out / "SOURCE.json").is_file() and not force:
        log(f"{out} is already prepared (SOURCE.json present); --force to redo it")
        return out
    if source_dir is not None and not Path(source_dir).is_dir():
        raise DataError(f"--source-dir {source_dir} is not a folder")
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--data-dir {data_dir}: cannot create it ({exc.strerror})") from None
    tmp = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{spec.folder}.tmp-"))
    os.chmod(tmp, 0o755)
    try:
        if source_dir is not None:
            origin = _fill_from_source(dataset, Path(source_dir), tmp)
        else:
            origin = _fill_from_hub(dataset, tmp)
        files = {spec.files[s]: file_record(tmp / spec.files[s]) for s in SPLITS}
        for split in SPLITS:
            if files[spec.files[split]]["lines"] == 0:
                raise DataError(f"the {split} split of {dataset} is empty")
        known = KNOWN_TOKENS[dataset]
        checks = {s: files[spec.files[s]]["tokens"] == known[s] for s in SPLITS}
        source = {"dataset": dataset, "origin": origin, "files": files,
                  "matches_published_token_counts": all(checks.values())}
        (tmp / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
        if out.exists():  # --force: swap the old folder out (its token cache goes with it)
            trash = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{spec.folder}.old-"))
            os.rename(out, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = " / ".join(f"{files[spec.files[s]]['tokens']:,}" for s in SPLITS)
    log(f"wrote {out} from {origin}: train/valid/test tokens {counts}")
    if not all(checks.values()):
        log(f"note: token counts differ from the published {dataset} figures "
            f"({' / '.join(f'{known[s]:,}' for s in SPLITS)}); fine for a custom or test corpus")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prepare_data.py", description="Prepare a corpus under data/.")
    parser.add_argument("--dataset", required=True, choices=(*CORPORA, "synthetic"))
    parser.add_argument("--data-dir", default="data", help="root folder (corpus goes to <data-dir>/<name>/)")
    parser.add_argument("--source-dir", default=None, help="a folder with the original files (offline path)")
    parser.add_argument("--force", action="store_true", help="prepare again even when already present")
    parser.add_argument("--synth-seed", type=int, default=1234, help="synthetic: seed of the language")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "synthetic":
            print(f"wrote {ensure_synthetic(args.data_dir, args.synth_seed)}")
        else:
            prepare(args.dataset, args.data_dir, args.source_dir, args.force)
    except DataError as exc:
        return error(str(exc), BAD_INPUT)
    return OK

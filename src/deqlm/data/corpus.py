"""Word-level corpora on disk -> cached token ids, ``TokenizedCorpus`` (dataset.py batches them).

Layout of a corpus folder (written by ``scripts/prepare_data.py``)::

    data/<folder>/{train,valid,test} files   SOURCE.json
    data/<folder>/cache/<tokenizer>-<key>/   meta.json, vocab.tsv or spm.model, {train,valid,test}.bin

``<key>`` hashes the sha256 of the three source files and the tokenizer settings, so editing a file or a
setting builds a new cache (the stale one of that tokenizer is removed). Token ids are raw ``uint16`` (vocab
up to 65,536) or ``uint32`` arrays opened as read-only numpy memmaps. Source files are hashed once; the
digests are remembered in ``cache/fingerprints.json`` by (size, mtime).

The cache is verified, never trusted: ``meta.json`` records the sha256 of each of its files (ids and
vocabulary) when it is built, and every load checks them (docs/data.md gives the cost). A damaged, partial or
unverifiable cache is rebuilt from the source files with one line saying why; a rebuild that cannot be written
is refused in one line naming the folder. Builds hold ``cache/.build.lock``, so the temp folders a killed
build left behind are removed by the next build, and a damaged folder is moved aside before the new one takes
its name.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deqlm.choices import Tokenizer, values
from deqlm.config import DataConfig
from deqlm.data.errors import DataError
from deqlm.data.synthetic import ensure_synthetic
from deqlm.data.tokenizers import SentencePieceVocab, WordVocab
from deqlm.infra.exits import warn

SPLITS = ("train", "valid", "test")
CACHE_VERSION = 1  # bump when the cache layout or tokenisation changes


@dataclass(frozen=True)
class CorpusSpec:
    name: str  # dataset key in DataConfig.dataset
    folder: str  # folder under data_dir
    files: dict  # split -> file name


CORPORA = {
    "ptb": CorpusSpec("ptb", "ptb", {s: f"ptb.{s}.txt" for s in SPLITS}),
    "wt103": CorpusSpec("wt103", "wikitext-103", {s: f"wiki.{s}.tokens" for s in SPLITS}),
    "wt2": CorpusSpec("wt2", "wikitext-2", {s: f"wiki.{s}.tokens" for s in SPLITS}),
}
WIKITEXT_FILES = {s: f"wiki.{s}.tokens" for s in SPLITS}


def locate_corpus(data_dir: str | os.PathLike, spec: CorpusSpec) -> Path:
    """``data_dir/<folder>``, or ``data_dir`` itself when it holds the corpus files."""
    for cand in (Path(data_dir) / spec.folder, Path(data_dir)):
        if (cand / spec.files["train"]).is_file():
            return cand
    raise DataError(f"no {spec.name} corpus in {Path(data_dir) / spec.folder} (no {spec.files['train']}); "
                    f"run `python scripts/prepare_data.py --dataset {spec.name} --data-dir {data_dir}` "
                    f"[--source-dir DIR]")


def split_files(corpus_dir: Path, names: dict) -> dict[str, Path]:
    """The three split files, each present and non-empty."""
    files = {}
    for split in SPLITS:
        path = Path(corpus_dir) / names[split]
        if not path.is_file():
            raise DataError(f"missing {split} file {path}")
        if path.stat().st_size == 0:
            raise DataError(f"empty {split} file {path}")
        files[split] = path
    return files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _fingerprints(files: dict[str, Path], cache_root: Path) -> dict[str, str]:
    """sha256 of each file, re-hashed only when its size or mtime changed since the last call."""
    memo_path = cache_root / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    out, changed = {}, False
    for split, path in files.items():
        st = path.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        entry = memo.get(path.name)
        if not entry or entry.get("stamp") != stamp:
            entry, changed = {"stamp": stamp, "sha256": sha256_file(path)}, True
            memo[path.name] = entry
        out[split] = entry["sha256"]
    if changed:
        try:
            _write_json(memo_path, memo)
        except OSError as exc:
            raise DataError(f"cannot write {memo_path} ({exc.strerror}); free space or fix permissions in "
                            f"{cache_root}, then run again") from None
    return out


def _write_json(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class TokenizedCorpus:
    """Token ids of the three splits (read-only memmaps) and the vocabulary that produced them."""

    corpus_dir: Path
    cache_dir: Path
    vocab: WordVocab | SentencePieceVocab
    ids: dict[str, np.ndarray]
    stats: dict[str, dict]  # split -> {tokens, words, lines, oov}


def open_corpus(cfg: DataConfig) -> tuple[str, TokenizedCorpus]:
    """(name, corpus) of a text dataset: a downloaded corpus, or the synthetic language (written once)."""
    if cfg.dataset == "synthetic":
        corpus_dir = ensure_synthetic(cfg.data_dir, cfg.synth_seed, cfg.synth_vocab, cfg.synth_train_tokens)
        return f"synthetic-{cfg.synth_seed}", load_corpus(corpus_dir, WIKITEXT_FILES, cfg.tokenizer,
                                                          cfg.sp_vocab_size)
    spec = CORPORA[cfg.dataset]
    corpus = load_corpus(locate_corpus(cfg.data_dir, spec), spec.files, cfg.tokenizer, cfg.sp_vocab_size)
    return cfg.dataset, corpus


def corpus_summary(name: str, corpus: TokenizedCorpus) -> dict:
    """The figures ``python -m deqlm.data inspect`` prints for a text corpus."""
    return {"dataset": name, "vocab_size": corpus.vocab.vocab_size,
            **{f"{split}_tokens": int(corpus.stats[split]["tokens"]) for split in SPLITS},
            "oov_valid": int(corpus.stats["valid"]["oov"]), "oov_test": int(corpus.stats["test"]["oov"])}


def _tokenizer_settings(tokenizer: str, sp_vocab_size: int) -> dict:
    if tokenizer == "word":
        return {"kind": "word"}
    if tokenizer == "sentencepiece":
        return {"kind": "sentencepiece", "vocab_size": int(sp_vocab_size), "model_type": "unigram"}
    raise DataError(f"data.tokenizer={tokenizer!r} is not one of {', '.join(values(Tokenizer))}")


def load_corpus(corpus_dir: str | os.PathLike, names: dict, tokenizer: str = "word",
                sp_vocab_size: int = 16000) -> TokenizedCorpus:
    """Load the cached ids of a corpus folder, building the cache first when it is missing or stale."""
    corpus_dir = Path(corpus_dir)
    files = split_files(corpus_dir, names)
    settings = _tokenizer_settings(tokenizer, sp_vocab_size)
    cache_root = corpus_dir / "cache"
    try:
        cache_root.mkdir(exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the token cache {cache_root} ({exc.strerror}); "
                        f"copy the corpus with scripts/prepare_data.py --source-dir") from None
    digests = _fingerprints(files, cache_root)
    key_src = json.dumps({"version": CACHE_VERSION, "files": digests, "tokenizer": settings}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()
    prefix = "word" if tokenizer == "word" else f"sp{sp_vocab_size}"
    cache_dir = cache_root / f"{prefix}-{key[:16]}"
    if cache_problem(cache_dir, key) is not None:
        with _build_lock(cache_root):
            problem = cache_problem(cache_dir, key)  # another process may have built it meanwhile
            if problem is not None:
                if cache_dir.exists():
                    warn(f"token cache {cache_dir} is {problem}; rebuilding it from {corpus_dir}")
                _clear_leftovers(cache_root)
                _build_cache(files, settings, key, cache_dir)
                for stale in cache_root.glob(f"{prefix}-*"):
                    if stale != cache_dir and stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
    return _load_cache(corpus_dir, cache_dir, key)


def cache_problem(cache_dir: Path, key: str) -> str | None:
    """What is wrong with a cache folder (None: whole and verified): absent, partial, from other sources,
    or a file (ids or vocabulary) whose bytes are not those it was built with."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
    except FileNotFoundError:
        return "partial (no meta.json)" if cache_dir.exists() else "absent"
    except (OSError, ValueError):
        return "damaged (unreadable meta.json)"
    if not isinstance(meta, dict):
        return "damaged (meta.json is not an object)"
    if meta.get("key") != key:
        return "stale (its key differs from the source files and tokenizer settings)"
    sums = meta.get("checksums")
    if not isinstance(sums, dict) or any(f"{split}.bin" not in sums for split in SPLITS):
        return "unverifiable (built without checksums)"
    for name, digest in sums.items():
        path = cache_dir / name
        if not path.is_file():
            return f"partial ({name} is missing)"
        if sha256_file(path) != digest:
            return f"damaged ({name} does not match its checksum)"
    return None


@contextmanager
def _build_lock(cache_root: Path):
    """One builder per cache folder at a time, across processes (the kernel drops it if the holder dies)."""
    try:
        fh = open(cache_root / ".build.lock", "a")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise DataError(f"cannot build the token cache in {cache_root} ({exc.strerror})") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fh.close()


def _clear_leftovers(cache_root: Path) -> None:
    """Temp and set-aside folders of builds that were killed (safe: the caller holds the build lock)."""
    for leftover in [*cache_root.glob(".build-*"), *cache_root.glob(".damaged-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _build_cache(files: dict[str, Path], settings: dict, key: str, cache_dir: Path) -> None:
    """Tokenize into a temporary folder, then rename it into place (a killed build leaves no cache)."""
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=f".build-{cache_dir.name}-"))
        os.chmod(tmp, 0o755)
        if settings["kind"] == "word":
            vocab: WordVocab | SentencePieceVocab = WordVocab.build(files["train"])
            vocab.save(tmp / "vocab.tsv")
        else:
            vocab = SentencePieceVocab.train(files["train"], tmp, settings["vocab_size"])
        stats = {split: vocab.encode_file(path, tmp / f"{split}.bin") for split, path in files.items()}
        meta = {"key": key, "tokenizer": settings, "vocab_size": vocab.vocab_size, "vocab_hash": vocab.hash,
                "dtype": vocab.dtype.name, "splits": stats,
                "files": {split: path.name for split, path in files.items()},
                "checksums": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}}  # ids and vocabulary
        _write_json(tmp / "meta.json", meta)
        _replace_dir(tmp, cache_dir)
    except OSError as exc:
        raise DataError(f"cannot build the token cache {cache_dir} ({exc.strerror}); free space or fix "
                        f"permissions in {cache_dir.parent}, then run again") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; whatever was there (a damaged or partial cache) is moved aside first, then
    removed, so no reader ever sees a mix of the two."""
    if target.exists():
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".damaged-{target.name}-"))
        os.rename(target, aside / target.name)
        os.rename(new, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(new, target)


def _load_cache(corpus_dir: Path, cache_dir: Path, key: str) -> TokenizedCorpus:
    def mismatch(what: str) -> DataError:
        return DataError(f"token cache {cache_dir} does not match: {what}; delete that folder to rebuild it")

    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
    except ValueError:
        raise mismatch("unreadable meta.json") from None
    if meta.get("key") != key:
        raise mismatch("its key differs from the source files and tokenizer settings")
    if meta["tokenizer"]["kind"] == "word":
        if not (cache_dir / "vocab.tsv").is_file():
            raise mismatch("vocab.tsv is missing")
        vocab: WordVocab | SentencePieceVocab = WordVocab.load(cache_dir / "vocab.tsv")
    else:
        vocab = SentencePieceVocab(cache_dir / SentencePieceVocab.model_name)
    if vocab.hash != meta["vocab_hash"] or vocab.vocab_size != meta["vocab_size"]:
        raise mismatch(f"vocabulary hash {vocab.hash} != {meta['vocab_hash']}")
    dtype = np.dtype(meta["dtype"])
    ids = {}
    for split in SPLITS:
        path, n = cache_dir / f"{split}.bin", meta["splits"][split]["tokens"]
        if not path.is_file() or path.stat().st_size != n * dtype.itemsize:
            raise mismatch(f"{split}.bin should hold {n} ids")
        arr = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
        if int(arr.max()) >= vocab.vocab_size:
            raise mismatch(f"{split}.bin has ids beyond the vocabulary of {vocab.vocab_size}")
        ids[split] = arr
    return TokenizedCorpus(corpus_dir, cache_dir, vocab, ids, meta["splits"])

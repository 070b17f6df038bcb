"""Tokenizers: the word vocabulary of the reference code, and SentencePiece as an alternative.

Both read a corpus one line at a time (WikiText-103's 540 MB train file is never held as Python strings) and
append one ``<eos>`` per line, blank lines included: the convention behind every published token count
(PyTorch word_language_model, AWD-LSTM, Transformer-XL).

Word vocabulary, exactly as Transformer-XL's ``Vocab.build_vocab`` builds it: counted on the train split only,
case kept, ``<eos>`` first (id 0), then every train word by descending frequency, ties in order of first
occurrence (a stable sort of the counts, i.e. ``Counter.most_common``). Frequent words come first, which the
adaptive softmax's cutoffs rely on. Words outside the vocabulary map to ``<unk>`` when the corpus has it
(WikiText, PTB), and are an error otherwise.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from deqlm.data.errors import DataError

EOS = "<eos>"
UNK = "<unk>"
_CHUNK_TOKENS = 1 << 20  # ids buffered before a write while encoding a file


def read_lines(path: str | os.PathLike) -> Iterator[str]:
    """The lines of a UTF-8 corpus file, split on "\\n" only (as ``wc -l`` counts them), newline included."""
    with open(path, encoding="utf-8", newline="\n") as fh:
        try:
            yield from fh
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None


def count_file(path: str | os.PathLike) -> tuple[int, int]:
    """(lines, words) of a corpus file; its token count is lines + words (one ``<eos>`` per line)."""
    n_lines = n_words = 0
    for line in read_lines(path):
        n_lines += 1
        n_words += len(line.split())
    return n_lines, n_words


def symbols_hash(symbols: list[str]) -> str:
    """A short, stable fingerprint of a vocabulary (stored in checkpoints to catch a mismatched corpus)."""
    return hashlib.sha256("\n".join(symbols).encode("utf-8")).hexdigest()[:16]


def _pick_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class _ChunkWriter:
    """Appends ids to a raw binary file in large chunks (the file is later opened as a numpy memmap)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.fh = open(path, "wb")
        self.dtype = dtype
        self.buf: list[int] = []
        self.n = 0

    def extend(self, ids: list[int]) -> None:
        self.buf.extend(ids)
        if len(self.buf) >= _CHUNK_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.fh.write(np.asarray(self.buf, dtype=self.dtype).tobytes())
            self.n += len(self.buf)
            self.buf = []

    def close(self) -> int:
        self.flush()
        self.fh.close()
        return self.n


class WordVocab:
    """Word-level vocabulary: ``symbols[i]`` is the word of id ``i``; ``<eos>`` is id 0."""

    kind = "word"

    def __init__(self, symbols: list[str], counts: list[int] | None = None):
        if not symbols or symbols[0] != EOS:
            raise DataError(f"a word vocabulary must start with {EOS}")
        self.symbols = symbols
        self.counts = counts if counts is not None else [0] * len(symbols)
        self.stoi = {s: i for i, s in enumerate(symbols)}
        if len(self.stoi) != len(symbols):
            raise DataError("the word vocabulary has duplicate symbols")
        self.eos_id = 0
        self.unk_id = self.stoi.get(UNK)
        self.dtype = _pick_dtype(len(symbols))

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    @property
    def hash(self) -> str:
        return symbols_hash(self.symbols)

    @classmethod
    def build(cls, train_path: str | os.PathLike) -> WordVocab:
        """Count the train split line by line (streaming) and order the words as the reference code does."""
        counter: Counter[str] = Counter()
        n_lines = 0
        for line in read_lines(train_path):
            counter.update(line.split())
            n_lines += 1
        counter.pop(EOS, None)  # a literal "<eos>" in the text would otherwise get a second id
        ordered = sorted(counter.items(), key=lambda kv: -kv[1])  # stable: ties keep first-occurrence order
        return cls([EOS] + [w for w, _ in ordered], [n_lines] + [c for _, c in ordered])

    def encode_file(self, path: str | os.PathLike, out_path: Path) -> dict:
        """Write the ids of a corpus file to ``out_path`` (raw ``self.dtype``); returns token / OOV counts."""
        writer = _ChunkWriter(out_path, self.dtype)
        stoi, eos, unk = self.stoi, self.eos_id, self.unk_id
        n_lines = n_oov = 0
        for line in read_lines(path):
            ids = [stoi.get(w, -1) for w in line.split()]
            ids.append(eos)
            n_lines += 1
            if -1 in ids:
                if unk is None:
                    writer.close()
                    raise DataError(f"{path}: words outside the train vocabulary and no {UNK} to map them to")
                n_oov += ids.count(-1)
                ids = [unk if i == -1 else i for i in ids]
            writer.extend(ids)
        n_tokens = writer.close()
        return {"tokens": n_tokens, "words": n_tokens, "lines": n_lines, "oov": n_oov}

    def save(self, path: Path) -> None:
        text = "".join(f"{s}\t{c}\n" for s, c in zip(self.symbols, self.counts))
        path.write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> WordVocab:
        symbols, counts = [], []
        for line in path.read_text(encoding="utf-8").splitlines():
            sym, _, cnt = line.partition("\t")
            symbols.append(sym)
            counts.append(int(cnt or 0))
        return cls(symbols, counts)


class SentencePieceVocab:
    """A SentencePiece model trained on the train split only; ``<eos>`` is appended per line like words.

    ``<unk>`` (WikiText's and PTB's own unknown-word token) is kept as one user-defined piece, and byte
    fallback makes every other string encodable, so no id is ever out of vocabulary.
    """

    kind = "sentencepiece"
    model_name = "spm.model"

    def __init__(self, model_path: Path):
        import sentencepiece as spm

        self.model_path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.symbols = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        self.eos_id = self.sp.eos_id()
        assert self.symbols[self.eos_id] == EOS
        self.dtype = _pick_dtype(len(self.symbols))

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    @property
    def hash(self) -> str:
        return symbols_hash(self.symbols)

    @classmethod
    def train(cls, train_path: str | os.PathLike, out_dir: Path, vocab_size: int,
              max_sentences: int = 2_000_000) -> SentencePieceVocab:
        """Train on (a seeded sample of at most ``max_sentences`` lines of) the train file only."""
        import sentencepiece as spm

        prefix = out_dir / cls.model_name.removesuffix(".model")
        spm.set_random_generator_seed(1111)  # the line sample is part of the cache key: keep it fixed
        try:
            spm.SentencePieceTrainer.train(
                input=str(train_path), model_prefix=str(prefix), vocab_size=vocab_size,
                model_type="unigram", character_coverage=0.9999, byte_fallback=True,
                unk_id=0, unk_piece="<sp_unk>", eos_id=1, eos_piece=EOS, bos_id=-1, pad_id=-1,
                user_defined_symbols=[UNK], hard_vocab_limit=False, input_sentence_size=max_sentences,
                shuffle_input_sentence=True, minloglevel=2, num_threads=os.cpu_count() or 1,
            )
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0]
            raise DataError(f"sentencepiece training on {train_path} failed: {reason}") from None
        return cls(prefix.with_suffix(".model"))

    def encode_file(self, path: str | os.PathLike, out_path: Path, batch_lines: int = 4096) -> dict:
        writer = _ChunkWriter(out_path, self.dtype)
        n_lines = n_words = 0
        batch: list[str] = []

        def flush() -> None:
            for ids in self.sp.encode([s.strip() for s in batch], out_type=int):
                ids.append(self.eos_id)
                writer.extend(ids)
            batch.clear()

        for line in read_lines(path):
            n_lines += 1
            n_words += len(line.split()) + 1
            batch.append(line)
            if len(batch) >= batch_lines:
                flush()
        flush()
        return {"tokens": writer.close(), "words": n_words, "lines": n_lines, "oov": 0}

"""The embedded synthetic language: deterministic, WikiText-formatted, with a known entropy rate."""

import json
import math
import shutil

import numpy as np
import pytest

from deqlm.config import DataConfig
from deqlm.data import synthetic
from deqlm.data.dataset import build_dataset
from deqlm.data.errors import DataError
from deqlm.data.synthetic import SynthLanguage, SynthParams, ensure_synthetic, generate_lines, oracle_nll


def test_same_seed_gives_the_same_bytes(tmp_path):
    a = ensure_synthetic(tmp_path / "a", seed=7, vocab=100, train_tokens=5000)
    b = ensure_synthetic(tmp_path / "b", seed=7, vocab=100, train_tokens=5000)
    c = ensure_synthetic(tmp_path / "c", seed=8, vocab=100, train_tokens=5000)
    for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens", "SOURCE.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "wiki.train.tokens").read_bytes() != (c / "wiki.train.tokens").read_bytes()
    assert a.name == "synthetic-7"


def test_files_use_the_wikitext_line_format(tmp_path):
    lines = (ensure_synthetic(tmp_path, vocab=100, train_tokens=5000) / "wiki.train.tokens").read_text()
    lines = lines.splitlines(keepends=True)
    assert lines[:2] == [" \n", lines[1]] and lines[1].startswith(" = ") and lines[1].endswith(" = \n")
    assert all(line == " \n" or (line.startswith(" ") and line.endswith(" \n")) for line in lines)
    paragraphs = [line for line in lines if line != " \n" and not line.startswith(" = ")]
    assert paragraphs and all(line.endswith(" . \n") for line in paragraphs)


def test_entropy_rate_is_stored_and_well_below_the_unigram_entropy(tmp_path):
    ds = build_dataset(DataConfig(dataset="synthetic", data_dir=str(tmp_path), synth_train_tokens=50_000))
    source = json.loads((ds.corpus_dir / "SOURCE.json").read_text())
    assert ds.entropy_rate == pytest.approx(source["entropy_rate"])
    assert ds.entropy_rate < source["unigram_entropy_train"] - 0.8  # best ppl < 0.45 x unigram ppl
    assert ds.vocab_size <= 201 and ds.carry_mems and ds.name == "synthetic-1234"
    for split in ("train", "valid", "test"):
        assert abs(source["oracle_nll"][split] - ds.entropy_rate) < 0.1


def test_oracle_probabilities_of_a_tiny_language_are_normalised():
    """Every one-sentence paragraph of up to 3 words after a heading: their oracle probabilities must sum to
    P(the first paragraph is one sentence of <= 3 words) = p_line * (1 - (1-q)^3)."""
    p = SynthParams(seed=3, vocab=22, n_topics=3, doc_entities=2, q=0.6, p_line=0.5)
    lang = SynthLanguage(p)
    words = lang.entities + lang.content
    head = [" \n", f" = {lang.entities[0]} = \n", " \n"]
    head_nll, _ = oracle_nll(lang, head)
    total, sentences = 0.0, [[w] for w in words]
    for length in range(1, 4):
        for sent in sentences:
            try:
                nll, _ = oracle_nll(lang, head + [" " + " ".join(sent) + " . \n"])
            except DataError:  # probability 0: more distinct entities than a document has
                continue
            total += math.exp(head_nll - nll)
        if length < 3:
            sentences = [s + [w] for s in sentences for w in words]
    assert total == pytest.approx(p.p_line * (1 - (1 - p.q) ** 3), rel=1e-9)


def test_oracle_rejects_text_outside_the_language():
    lang = SynthLanguage(SynthParams(vocab=60))
    with pytest.raises(DataError, match="not in the language"):
        oracle_nll(lang, [" \n", " = nope = \n"])


def test_generation_is_fast_and_counts_tokens():
    lang = SynthLanguage(SynthParams(vocab=200))
    lines = generate_lines(lang, "train", 20_000)
    nll, n_tok = oracle_nll(lang, lines)
    assert n_tok == sum(len(line.split()) + 1 for line in lines) >= 20_000
    assert np.isfinite(nll) and 2.0 < nll / n_tok < 5.0


def test_too_little_train_text_for_the_vocabulary_is_a_clear_error(tmp_path):
    # seed 99 with 5000 train tokens leaves one valid word type out of train: no <unk> could take it
    with pytest.raises(DataError, match="synth_train_tokens=5000 is too small for data.synth_vocab=200"):
        build_dataset(DataConfig(dataset="synthetic", data_dir=str(tmp_path), synth_seed=99, synth_vocab=200,
                                 synth_train_tokens=5000))


def test_a_corpus_another_run_finished_meanwhile_is_kept_with_its_cache(tmp_path, monkeypatch):
    """Two runs starting together both generate; the slower one must not replace the folder (and the token
    cache being built inside it) that the faster one already put in place with the same settings."""
    kw = {"seed": 3, "vocab": 20, "train_tokens": 2000}
    first = ensure_synthetic(tmp_path / "other", **kw)
    real_generate = synthetic.generate_lines
    out = synthetic.synthetic_dir(tmp_path, 3)

    def generate_while_the_other_run_finishes(*args):
        if not out.exists():
            shutil.copytree(first, out)
            (out / "cache").mkdir()
            (out / "cache" / "being-built").write_text("x")
        return real_generate(*args)

    monkeypatch.setattr(synthetic, "generate_lines", generate_while_the_other_run_finishes)
    assert ensure_synthetic(tmp_path, **kw) == out
    assert (out / "cache" / "being-built").is_file()

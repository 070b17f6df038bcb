"""Vocabulary, token counts and token caches of word-level corpora (deqlm.data.corpus / tokenizers)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from deqlm.config import DataConfig
from deqlm.data.__main__ import main as data_main
from deqlm.data.dataset import build_dataset
from deqlm.data.errors import DataError
from deqlm.data.prepare import prepare

PTB_DIR = Path(os.environ.get("DEQLM_PTB_DIR") or Path(__file__).parents[2] / "shared" / "data" / "ptb")

# A WikiText-format corpus counted by hand (see the comments for the counts).
TRAIN = (
    " \n"                               # blank line: 0 words
    " = Alpha = \n"                     # heading: 3 words
    " \n"
    " the cat sat on the mat . \n"      # 7 words
    " \n"
    " = = Beta = = \n"                  # sub-heading: 5 words
    " \n"
    " the dog <unk> the cat . \n"       # 6 words
)  # 8 lines, 21 words -> 29 tokens
VALID = " \n = Gamma = \n \n the bird sat . \n"  # 4 lines, 7 words -> 11 tokens; Gamma, bird are OOV
TEST = " the cat . \n"  # 1 line, 3 words -> 4 tokens


def write_wikitext(folder: Path, train=TRAIN, valid=VALID, test=TEST) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    return folder


def wt2(data_dir: Path, **kw):
    return build_dataset(DataConfig(dataset="wt2", data_dir=str(data_dir), **kw))


@pytest.mark.skipif(not (PTB_DIR / "ptb.train.txt").is_file(), reason="shared PTB copy not present")
def test_ptb_vocab_and_token_counts_match_reference(tmp_path):
    prepare("ptb", tmp_path, source_dir=PTB_DIR, log=lambda *_: None)
    ds = build_dataset(DataConfig(dataset="ptb", data_dir=str(tmp_path)))
    assert ds.vocab_size == 10_000 and ds.n_classes == 10_000
    assert [ds.split_tokens(s) for s in ("train", "valid", "test")] == [929_589, 73_760, 82_430]
    assert ds.split_oov("valid") == ds.split_oov("test") == 0
    assert ds.ids("train").dtype == np.uint16
    assert ds.vocab.symbols[:4] == ["<eos>", "the", "<unk>", "N"]


def test_word_vocab_follows_reference_order_on_hand_counted_wikitext(tmp_path):
    ds = wt2(write_wikitext(tmp_path / "wikitext-2"))
    # <eos> first, then by frequency (= 6, the 4, cat 2, . 2), ties in order of first occurrence
    assert ds.vocab.symbols == ["<eos>", "=", "the", "cat", ".", "Alpha", "sat", "on", "mat", "Beta", "dog",
                                "<unk>"]
    assert ds.vocab.counts[:5] == [8, 6, 4, 2, 2]
    assert (ds.split_tokens("train"), ds.split_tokens("valid"), ds.split_tokens("test")) == (29, 11, 4)
    assert ds.split_words("train") == 29
    assert ds.ids("train")[:5].tolist() == [0, 1, 5, 1, 0]  # blank <eos>, "= Alpha =" <eos>


def test_oov_words_map_to_unk_and_are_counted(tmp_path):
    ds = wt2(write_wikitext(tmp_path / "wikitext-2"))
    unk = ds.vocab.symbols.index("<unk>")
    assert ds.ids("valid").tolist() == [0, 1, unk, 1, 0, 0, 2, unk, 6, 4, 0]
    assert ds.summary() == {"dataset": "wt2", "vocab_size": 12, "train_tokens": 29, "valid_tokens": 11,
                            "test_tokens": 4, "oov_valid": 2, "oov_test": 0}


def test_oov_without_unk_in_vocabulary_is_a_data_error(tmp_path):
    folder = write_wikitext(tmp_path / "wikitext-2", train=" a b \n", valid=" a c \n", test=" a \n")
    with pytest.raises(DataError, match="outside the train vocabulary"):
        wt2(folder.parent)


def test_cache_is_reused_and_rebuilt_when_a_source_file_changes(tmp_path):
    folder = write_wikitext(tmp_path / "wikitext-2")
    first = wt2(tmp_path).corpus.cache_dir
    assert wt2(tmp_path).corpus.cache_dir == first
    (folder / "wiki.test.tokens").write_text(" the the cat . \n")
    ds = wt2(tmp_path)
    assert ds.corpus.cache_dir != first and not first.exists()
    assert ds.split_tokens("test") == 5


def test_data_dir_may_be_the_corpus_folder_itself(tmp_path):
    assert wt2(write_wikitext(tmp_path / "anywhere")).split_tokens("test") == 4


def _ids(ds) -> dict:
    return {split: np.array(ds.ids(split)) for split in ("train", "valid", "test")}


@pytest.mark.parametrize("damage", ["zeroed_ids", "edited_vocab", "missing_meta", "missing_ids"])
def test_a_damaged_cache_is_rebuilt_with_one_line_and_never_used(tmp_path, capsys, damage):
    ds = wt2(write_wikitext(tmp_path / "wikitext-2"))
    cache, good = ds.corpus.cache_dir, _ids(ds)
    capsys.readouterr()
    if damage == "zeroed_ids":  # a block of the id file zeroed out: same size, wrong tokens
        data = bytearray((cache / "train.bin").read_bytes())
        data[4:20] = bytes(16)
        (cache / "train.bin").write_bytes(bytes(data))
    elif damage == "edited_vocab":
        vocab = cache / "vocab.tsv"
        vocab.write_text(vocab.read_text().replace("cat\t", "kat\t"))
    elif damage == "missing_meta":  # the rebuild must replace a folder that already has files in it
        (cache / "meta.json").unlink()
    else:
        (cache / "valid.bin").unlink()
    again = wt2(tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: token cache {cache} is ") and "rebuilding" in err[0]
    assert again.corpus.cache_dir == cache and all((_ids(again)[k] == good[k]).all() for k in good)
    assert not [p for p in cache.parent.iterdir() if p.name.startswith((".build-", ".damaged-"))]
    wt2(tmp_path)  # now whole: loaded without a word
    assert capsys.readouterr().err == ""


def test_a_cache_built_without_checksums_is_rebuilt_once(tmp_path, capsys):
    ds = wt2(write_wikitext(tmp_path / "wikitext-2"))
    meta_path = ds.corpus.cache_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["checksums"]
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    wt2(tmp_path)
    assert "unverifiable (built without checksums)" in capsys.readouterr().err
    assert "checksums" in json.loads(meta_path.read_text())


def test_temp_folders_of_killed_builds_are_removed_by_the_next_build(tmp_path):
    folder = write_wikitext(tmp_path / "wikitext-2")
    leftover = folder / "cache" / ".build-word-0123456789abcdef-killed"
    leftover.mkdir(parents=True)
    (leftover / "train.bin").write_bytes(b"half")
    wt2(tmp_path)
    assert not leftover.exists()


def test_a_rebuild_that_cannot_be_written_is_refused_in_one_line_naming_the_folder(tmp_path, monkeypatch):
    import errno

    from deqlm.data import corpus

    def full(new, target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(corpus, "_replace_dir", full)
    with pytest.raises(DataError, match="cannot build the token cache .*No space left on device") as err:
        wt2(write_wikitext(tmp_path / "wikitext-2"))
    assert "\n" not in str(err.value)
    assert not [p for p in (tmp_path / "wikitext-2" / "cache").iterdir() if p.name.startswith(".build-")]


def test_missing_file_and_empty_split_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no wt2 corpus"):
        wt2(tmp_path)
    folder = write_wikitext(tmp_path / "wikitext-2")
    (folder / "wiki.valid.tokens").unlink()
    with pytest.raises(DataError, match="missing valid file"):
        wt2(tmp_path)
    (folder / "wiki.valid.tokens").write_text("")
    with pytest.raises(DataError, match="empty valid file"):
        wt2(tmp_path)


def test_sentencepiece_runs_keep_word_counts_for_word_level_perplexity(tmp_path):
    cfg = dict(data_dir=str(tmp_path), synth_train_tokens=20_000, tokenizer="sentencepiece",
               sp_vocab_size=400)
    sp = build_dataset(DataConfig(dataset="synthetic", **cfg))
    word = build_dataset(DataConfig(dataset="synthetic", **{**cfg, "tokenizer": "word"}))
    assert sp.tokenizer == "sentencepiece" and sp.vocab_size <= 400
    for split in ("train", "valid", "test"):
        assert sp.split_words(split) == word.split_tokens(split)
        assert int(sp.ids(split).max()) < sp.vocab_size
    assert (sp.corpus.cache_dir / "spm.model").is_file() and sp.vocab_hash != word.vocab_hash


def test_inspect_cli_prints_one_json_line_or_a_one_line_error(tmp_path, capsys):
    write_wikitext(tmp_path / "wikitext-2")
    assert data_main(["inspect", "--dataset", "wt2", "--data-dir", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["valid_tokens"] == 11
    assert data_main(["inspect", "--dataset", "ptb", "--data-dir", str(tmp_path), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1

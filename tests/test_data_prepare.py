"""scripts/prepare_data.py: offline --source-dir path, hub parquet reconstruction, no-network error."""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deqlm.data import prepare as prep
from deqlm.data.errors import DataError

PTB_DIR = Path(os.environ.get("DEQLM_PTB_DIR") or Path(__file__).parents[2] / "shared" / "data" / "ptb")
WIKI = {"train": " \n = A = \n \n a b <unk> . \n", "valid": " \n b a . \n", "test": " a . \n"}


def quiet(*_):
    pass


def wiki_source(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in WIKI.items():
        (folder / f"wiki.{split}.tokens").write_text(text)
    return folder


def test_source_dir_copies_the_files_and_writes_source_json(tmp_path):
    out = prep.prepare("wt2", tmp_path / "data", source_dir=wiki_source(tmp_path / "src"), log=quiet)
    assert out == tmp_path / "data" / "wikitext-2"
    for split, text in WIKI.items():
        assert (out / f"wiki.{split}.tokens").read_text() == text
    source = json.loads((out / "SOURCE.json").read_text())
    assert source["files"]["wiki.train.tokens"]["tokens"] == 4 + 7
    assert source["origin"].startswith("source-dir:")
    assert source["matches_published_token_counts"] is False
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["wikitext-2"]  # no temp folder left


@pytest.mark.skipif(not (PTB_DIR / "ptb.train.txt").is_file(), reason="shared PTB copy not present")
def test_ptb_from_the_shared_copy_matches_the_published_counts(tmp_path):
    out = prep.prepare("ptb", tmp_path, source_dir=PTB_DIR, log=quiet)
    source = json.loads((out / "SOURCE.json").read_text())
    assert source["matches_published_token_counts"] is True
    assert source["files"]["ptb.train.txt"]["sha256"].startswith("fcea919f")


def test_missing_source_files_are_a_one_line_error(tmp_path, capsys):
    src = wiki_source(tmp_path / "src")
    (src / "wiki.test.tokens").unlink()
    code = prep.main(["--dataset", "wt103", "--data-dir", str(tmp_path / "d"), "--source-dir", str(src)])
    err = capsys.readouterr().err
    assert code == 2 and "wiki.test.tokens" in err and err.count("\n") == 1


def test_a_source_file_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys):
    src = wiki_source(tmp_path / "src")
    (src / "wiki.test.tokens").write_bytes(b" a .\n\xff\xfe b\n")
    code = prep.main(["--dataset", "wt2", "--data-dir", str(tmp_path / "d"), "--source-dir", str(src)])
    err = capsys.readouterr().err
    assert code == 2 and "wiki.test.tokens: line 2 is not UTF-8" in err and err.count("\n") == 1
    assert not list((tmp_path / "d").iterdir())  # no corpus and no temp folder left behind


def test_no_network_gives_a_one_line_error_naming_the_offline_path(tmp_path, monkeypatch, capsys):
    def offline(dataset, split):
        raise OSError("Failed to resolve 'huggingface.co'\nmore detail")

    monkeypatch.setattr(prep, "download_parquet", offline)
    code = prep.main(["--dataset", "wt103", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--source-dir" in err and "Salesforce/wikitext" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def write_parquet(path: Path, column: str, rows: list[str]) -> Path:
    pq.write_table(pa.table({column: rows}), path)
    return path


def test_hub_rows_rebuild_the_original_file_bytes(tmp_path, monkeypatch):
    wiki_rows = ["", " = A = \n", "", " a b <unk> . \n"]
    ptb_rows = ["a b <unk>", "n c"]

    def fake(dataset, split):
        if dataset == "ptb":
            return [write_parquet(tmp_path / f"ptb-{split}.parquet", "sentence", ptb_rows)]
        half = len(wiki_rows) // 2  # two shards, like WikiText-103's train split
        return [write_parquet(tmp_path / f"w-{split}-{i}.parquet", "text", rows)
                for i, rows in enumerate([wiki_rows[:half], wiki_rows[half:]])]

    monkeypatch.setattr(prep, "download_parquet", fake)
    wt = prep.prepare("wt103", tmp_path / "data", log=quiet)
    assert (wt / "wiki.train.tokens").read_bytes() == b" \n = A = \n \n a b <unk> . \n"
    ptb = prep.prepare("ptb", tmp_path / "data", log=quiet)
    assert (ptb / "ptb.valid.txt").read_bytes() == b" a b <unk> \n n c \n"
    origin = json.loads((ptb / "SOURCE.json").read_text())["origin"]
    assert origin.startswith("hub:ptb-text-only/ptb_text_only")


def test_an_interrupted_download_leaves_no_corpus(tmp_path, monkeypatch):
    def fails_on_valid(dataset, split):
        if split == "valid":
            raise ConnectionError("connection reset")
        return [write_parquet(tmp_path / "t.parquet", "text", [" a \n"])]

    monkeypatch.setattr(prep, "download_parquet", fails_on_valid)
    with pytest.raises(DataError, match="connection reset"):
        prep.prepare("wt2", tmp_path / "data", log=quiet)
    assert list((tmp_path / "data").iterdir()) == []


def test_an_existing_corpus_is_kept_unless_forced(tmp_path):
    src = wiki_source(tmp_path / "src")
    out = prep.prepare("wt2", tmp_path, source_dir=src, log=quiet)
    (src / "wiki.test.tokens").write_text(" b . \n")
    prep.prepare("wt2", tmp_path, source_dir=src, log=quiet)
    assert (out / "wiki.test.tokens").read_text() == WIKI["test"]
    prep.prepare("wt2", tmp_path, source_dir=src, force=True, log=quiet)
    assert (out / "wiki.test.tokens").read_text() == " b . \n"

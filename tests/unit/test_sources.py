"""Raw documents from real files in tmp_path: every format, folders, globs, filters, splits, and the
InputError sentences for bad input (which must name the file, the line and the field)."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmtune.config import SourceConfig
from lmtune.data.sources import (
    SourceStats,
    fingerprint_texts,
    get_field,
    iter_documents,
    load_corpus,
    split_train_validation,
    suffix_of,
    text_of,
)
from lmtune.errors import InputError

from ..helpers import write_jsonl

WHERE = "data.train"


def read(path, **kw) -> tuple[list[str], SourceStats]:
    """Documents of a source over real files, and its stats."""
    paths = [str(p) for p in path] if isinstance(path, list) else str(path)
    stats = SourceStats()
    return list(iter_documents(SourceConfig(path=paths, **kw), WHERE, stats)), stats


def error_of(path, **kw) -> str:
    """The InputError sentence that loading this source gives."""
    paths = [str(p) for p in path] if isinstance(path, list) else str(path)
    with pytest.raises(InputError) as info:
        load_corpus(SourceConfig(path=paths, **kw), WHERE)
    message = str(info.value)
    assert message == info.value.message and "\n" not in message  # one sentence
    assert message.startswith(WHERE)  # says which source
    return message


def write_csv(path: Path, rows, delimiter=",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, delimiter=delimiter).writerows(rows)
    return path


def gzip_copy(path: Path) -> Path:
    out = path.with_name(path.name + ".gz")
    out.write_bytes(gzip.compress(path.read_bytes()))
    return out


ELI5_RECORDS = [
    {"q_id": "a1", "title": "Why is the sky blue?",
     "answers": {"a_id": ["x", "y"], "text": ["Rayleigh scattering.", "Blue light  scatters more."],
                 "score": [12, 3]}},
    {"q_id": "a2", "title": "Why do cats purr?",
     "answers": {"a_id": ["z"], "text": ["Nobody knows for sure."], "score": [5]}},
    # Empty answers are flattened away (no double space, no leading space).
    {"q_id": "a3", "title": "Empty?", "answers": {"a_id": ["p", "q", "r"], "text": ["One.", "", "Two."],
                                                  "score": [1, 1, 1]}},
]
ELI5_TEXTS = ["Rayleigh scattering. Blue light  scatters more.", "Nobody knows for sure.", "One. Two."]


# --------------------------------------------------------------------------------------------------
# Plain text


TXT = "first line\nsecond line\n\n   \nthird paragraph\n  indented line\n\n\n\nlast\n"


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        ("file", [TXT]),
        ("line", ["first line", "second line", "third paragraph", "  indented line", "last"]),
        # A line holding only spaces separates paragraphs like an empty one does.
        ("paragraph", ["first line\nsecond line", "third paragraph\n  indented line", "last"]),
    ],
)
def test_txt_units(tmp_path, unit, expected):
    path = tmp_path / "notes.txt"
    path.write_bytes(TXT.encode())
    docs, stats = read(path, txt_unit=unit)
    assert docs == expected
    assert stats.documents == len(expected)
    assert (stats.files_seen, stats.files_kept) == (1, 1)
    assert stats.bytes_seen == stats.bytes_kept == len(TXT.encode())


@pytest.mark.parametrize("unit", ["line", "paragraph"])
def test_txt_windows_line_ends_split_like_unix_ones(tmp_path, unit):
    (tmp_path / "unix.txt").write_bytes(TXT.encode())
    (tmp_path / "dos.txt").write_bytes(TXT.replace("\n", "\r\n").encode())
    unix, _ = read(tmp_path / "unix.txt", txt_unit=unit)
    dos, _ = read(tmp_path / "dos.txt", txt_unit=unit)
    assert dos == unix


def test_txt_lines_are_split_on_line_breaks_only(tmp_path):
    # Form feeds (common in source code), NEL and U+2028 live inside a line; only \n, \r\n, \r end one.
    lines = ["page one\x0cpage two", "next\x85line", "para\u2028graph", "tab\tseparated"]
    path = tmp_path / "odd.txt"
    path.write_bytes("\n".join(lines).encode())
    assert read(path, txt_unit="line")[0] == lines


def test_utf8_bom_is_not_part_of_the_text(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello world\n")
    assert read(path)[0] == ["hello world\n"]


def test_text_suffixes_and_empty_files(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\nbody\n")
    (tmp_path / "b.py").write_text("import os\n")
    (tmp_path / "c.txt").write_text("")  # empty: no document, not kept
    (tmp_path / "d.TXT").write_text("upper-case suffix\n")
    (tmp_path / "e.rst").write_text("   \n\n")  # blank: no document
    docs, stats = read(tmp_path)
    assert docs == ["# Title\n\nbody\n", "import os\n", "upper-case suffix\n"]
    assert (stats.files_seen, stats.files_kept) == (5, 3)


# --------------------------------------------------------------------------------------------------
# Tables: jsonl, json, csv, tsv, parquet


def test_jsonl_with_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"id": 1, "body": "alpha beta"}) + "\n\n   \n"  # blank lines are skipped
        + json.dumps({"id": 2, "body": "ünïcödé ✓"}) + "\r\n"
        + json.dumps({"id": 3, "body": ""}) + "\n"  # empty text: no document
        + json.dumps({"id": 4, "body": None}) + "\n"  # missing value: no document
        + json.dumps({"id": 5, "body": "gamma\ndelta"}),  # no final newline
        encoding="utf-8",
    )
    docs, stats = read(path, text_field="body")
    assert docs == ["alpha beta", "ünïcödé ✓", "gamma\ndelta"]
    assert (stats.files_seen, stats.files_kept, stats.documents) == (1, 1, 3)
    assert stats.bytes_seen == path.stat().st_size
    assert 0 < stats.bytes_kept < stats.bytes_seen


def test_ndjson_suffix(tmp_path):
    path = write_jsonl(tmp_path / "d.ndjson", [{"text": "one"}, {"text": "two"}])
    assert read(path)[0] == ["one", "two"]


@pytest.mark.parametrize("wrap", ["list", "data", "data-with-metadata"])
def test_json_list_and_data_object(tmp_path, wrap):
    records = [{"content": f"document {i}", "n": i} for i in range(4)]
    obj = {"list": records, "data": {"data": records},
           "data-with-metadata": {"version": "1.0", "data": records}}[wrap]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(obj, indent=2))
    docs, stats = read(path, text_field="content")
    assert docs == [f"document {i}" for i in range(4)]
    assert (stats.files_seen, stats.files_kept, stats.documents) == (1, 1, 4)
    assert stats.bytes_kept == sum(len(d.encode()) for d in docs)


@pytest.mark.parametrize(("suffix", "delimiter"), [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, suffix, delimiter):
    texts = ["plain", "with, comma", 'with "quotes"', "two\nlines", "tab\tinside" if suffix == ".csv" else "x"]
    rows = [["id", "text", "label"]] + [[str(i), t, "pos"] for i, t in enumerate(texts)]
    rows.insert(3, ["9", "", "neg"])  # empty cell: no document
    path = write_csv(tmp_path / f"d{suffix}", rows, delimiter=delimiter)
    docs, stats = read(path)
    assert docs == texts
    assert (stats.files_seen, stats.files_kept, stats.documents) == (1, 1, len(texts))
    assert stats.bytes_kept == sum(len(t.encode()) for t in texts)


def test_csv_with_excel_bom_header(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\nhello,1\nworld,0\n")
    assert read(path)[0] == ["hello", "world"]


def test_csv_with_a_field_larger_than_the_csv_module_default(tmp_path):
    big = "word " * 60_000  # 300 kB, over csv's default field limit of 128 kB
    path = write_csv(tmp_path / "big.csv", [["text"], [big], ["small"]])
    assert read(path)[0] == [big, "small"]


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "body": ["one", None, "three", ""]}), path)
    docs, stats = read(path, text_field="body")
    assert docs == ["one", "three"]
    assert (stats.files_seen, stats.files_kept, stats.documents) == (1, 1, 2)
    assert stats.bytes_seen == path.stat().st_size
    assert stats.bytes_kept == len("onethree")


def test_parquet_large_file_spans_several_batches(tmp_path):
    path = tmp_path / "many.parquet"
    texts = [f"row {i}" for i in range(10_000)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=3000)
    assert read(path)[0] == texts


# --------------------------------------------------------------------------------------------------
# Nested fields (the ELI5 tutorial's `answers.text`)


def test_get_field_and_text_of():
    record = {"a": {"b": [{"c": "x"}, {"c": ["y", "z"]}, {"d": 1}]}, "a.b": "literal", "n": 3}
    assert get_field(record, "a.b.c") == ["x", ["y", "z"]]
    assert get_field(record, "a.b") == "literal"  # a literal dotted key wins
    assert get_field(record, "n") == 3
    for missing in ("m", "a.x", "n.x"):
        with pytest.raises(KeyError):
            get_field(record, missing)
    assert text_of([["a", "b"], "c", None, ""]) == "a b c"
    assert text_of("  kept as is ") == "  kept as is "
    assert text_of(None) is None
    for bad in (1, 2.0, {"a": "b"}, ["a", 1]):
        with pytest.raises(TypeError):
            text_of(bad)


@pytest.mark.parametrize(("name", "suffix"), [("a.jsonl.gz", ".jsonl"), ("a.TXT", ".txt"), ("v1.2.csv", ".csv"),
                                              ("a.gz", ""), ("README", ""), ("a.tar.gz", ".tar")])
def test_suffix_of(name, suffix):
    assert suffix_of(Path(name)) == suffix


def test_nested_field_in_jsonl_json_and_parquet(tmp_path):
    jsonl = write_jsonl(tmp_path / "eli5.jsonl", ELI5_RECORDS)
    as_json = tmp_path / "eli5.json"
    as_json.write_text(json.dumps(ELI5_RECORDS))
    parquet = tmp_path / "eli5.parquet"
    pq.write_table(pa.Table.from_pylist(ELI5_RECORDS), parquet)
    assert pa.types.is_struct(pq.read_schema(parquet).field("answers").type)
    for path in (jsonl, as_json, parquet):
        assert read(path, text_field="answers.text")[0] == ELI5_TEXTS, path.name


def test_nested_field_across_a_list_of_objects(tmp_path):
    records = [{"answers": [{"text": "first", "score": 1}, {"text": "second", "score": 2}]},
               {"answers": [{"text": ["deep", "list"]}, {"score": 3}, {"text": "end"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert read(path, text_field="answers.text")[0] == ["first second", "deep list end"]
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records[:1]), parquet)
    assert read(parquet, text_field="answers.text")[0] == ["first second"]


def test_flattened_dotted_column_names(tmp_path):
    # `datasets`' flatten() (as in the ELI5 tutorial) names the column 'answers.text' literally.
    rows = [{"title": "t1", "answers.text": ["a", "b"]}, {"title": "t2", "answers.text": ["c"]}]
    jsonl = write_jsonl(tmp_path / "flat.jsonl", rows)
    parquet = tmp_path / "flat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        assert read(path, text_field="answers.text")[0] == ["a b", "c"], path.name


# --------------------------------------------------------------------------------------------------
# gzip, folders, globs


def test_gzipped_files_read_like_plain_ones(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    write_jsonl(plain / "a.jsonl", ELI5_RECORDS)
    (plain / "b.json").write_text(json.dumps(ELI5_RECORDS))
    pq.write_table(pa.Table.from_pylist(ELI5_RECORDS), plain / "c.parquet")
    write_csv(plain / "d.csv", [["answers.text"], ["x, y"], ["z"]])
    (plain / "e.txt").write_text("para one\n\npara two\n")
    for path in sorted(plain.iterdir()):
        gz = gzip_copy(path)
        expected, _ = read(path, text_field="answers.text", txt_unit="paragraph")
        got, stats = read(gz, text_field="answers.text", txt_unit="paragraph")
        assert got == expected and got, gz.name
        assert stats.files_kept == 1, gz.name


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b" / "deep" / "er").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "b" / "c.txt").write_text("C")
    (tmp_path / "b" / "deep" / "er" / "d.jsonl").write_text('{"text": "D"}\n')
    gzip_copy((tmp_path / "b" / "c.txt")).rename(tmp_path / "b" / "deep" / "e.txt.gz")
    (tmp_path / "b" / "ignored.bin").write_bytes(b"\x00\x01")  # unsupported files in folders are skipped
    (tmp_path / "b" / "archive.tar.gz").write_bytes(b"\x00")
    (tmp_path / "b" / "README").write_text("no suffix")
    docs, stats = read(tmp_path)
    assert docs == ["A", "C", "C", "D"]  # a.txt, b/c.txt, b/deep/e.txt.gz, b/deep/er/d.jsonl
    assert stats.files_seen == 4


def test_globs_and_lists_of_paths(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    for name in ["1.txt", "2.txt", "x/3.txt", "x/y/4.txt", "x/5.md"]:
        (tmp_path / name).write_text(Path(name).stem)
    assert read(tmp_path / "*.txt")[0] == ["1", "2"]
    assert read(tmp_path / "**" / "*.txt")[0] == ["1", "2", "3", "4"]
    assert read(tmp_path / "x" / "?.*")[0] == ["3", "5"]
    # A list of sources, overlapping: every file once, in the order first named.
    docs, stats = read([tmp_path / "x" / "y" / "4.txt", tmp_path / "*.txt", tmp_path / "2.txt", tmp_path / "x"])
    assert docs == ["4", "1", "2", "3", "5"]
    assert stats.files_seen == 5


def test_existing_path_with_glob_characters_is_taken_literally(tmp_path):
    folder = tmp_path / "run[1]"
    folder.mkdir()
    (folder / "a.txt").write_text("bracketed")
    assert read(folder)[0] == ["bracketed"]
    assert read(folder / "a.txt")[0] == ["bracketed"]


# --------------------------------------------------------------------------------------------------
# Filters and limits


def test_max_documents(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    docs, stats = read(path, max_documents=3)
    assert docs == ["doc 0", "doc 1", "doc 2"] and stats.documents == 3
    assert len(load_corpus(SourceConfig(path=str(path), max_documents=3), WHERE).texts) == 3
    assert read(path, max_documents=50)[0] == [f"doc {i}" for i in range(10)]


def test_max_documents_counts_documents_after_the_filter(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"{'pandas' if i % 3 == 0 else 'numpy'} {i}"}
                                             for i in range(20)])
    docs, _ = read(path, keywords=["pandas"], max_documents=4)
    assert docs == ["pandas 0", "pandas 3", "pandas 6", "pandas 9"]


def test_keyword_filter_any_and_none(tmp_path):
    texts = ["import pandas as pd", "import numpy", "from sklearn import svm", "Pandas upper case", "plain"]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    kw = ["pandas", "sklearn"]
    kept, s_any = read(path, keywords=kw, keyword_mode="any")
    dropped, s_none = read(path, keywords=kw, keyword_mode="none")
    assert kept == ["import pandas as pd", "from sklearn import svm"]  # case-sensitive substrings
    assert dropped == ["import numpy", "Pandas upper case", "plain"]
    assert (s_any.documents, s_any.filtered_out) == (2, 3)
    assert (s_none.documents, s_none.filtered_out) == (3, 2)
    assert read(path)[0] == texts  # no keywords: no filter
    assert read(path, keyword_mode="none")[0] == texts
    summary = s_any.summary("data.train")
    assert "2 documents" in summary and "3 removed by the keyword filter" in summary


# --------------------------------------------------------------------------------------------------
# Not UTF-8


def test_undecodable_txt_file_is_skipped_and_counted(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("fine text", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    docs, stats = read(tmp_path)
    assert docs == ["fine text"]
    assert len(stats.undecodable) == 1 and stats.undecodable[0].endswith("latin1.txt")
    assert (stats.files_seen, stats.files_kept) == (2, 1)
    assert "1 skipped as not UTF-8" in stats.summary("data.train")
    with caplog.at_level(logging.WARNING, logger="lmtune"):
        corpus = load_corpus(SourceConfig(path=str(tmp_path)), WHERE)
    assert corpus.texts == ["fine text"]
    assert "latin1.txt" in caplog.text and "undecodable" in caplog.text


def test_undecodable_jsonl_line_is_skipped_and_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": "caf\xe9"}\n{"text": "three"}\n')
    docs, stats = read(path)
    assert docs == ["one", "three"]
    assert len(stats.undecodable) == 1 and stats.undecodable[0].endswith("d.jsonl:2")
    assert stats.files_kept == 1


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_undecodable_table_file_is_skipped_and_counted(tmp_path, suffix):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes('[{"text": "café"}]'.encode("latin-1") if suffix == ".json" else "text\ncafé\n".encode("cp1252"))
    (tmp_path / "good.txt").write_text("ok")
    docs, stats = read(tmp_path)
    assert docs == ["ok"]
    assert len(stats.undecodable) == 1 and stats.undecodable[0].endswith(bad.name)


# --------------------------------------------------------------------------------------------------
# The running Python's own code


def _reference_stdlib_hits(keyword: str) -> int:
    """How many stdlib .py files (outside site-packages and caches) are UTF-8 and mention the keyword."""
    hits = 0
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = [d for d in dirnames if d not in {"__pycache__", "site-packages", "dist-packages"}]
        for name in filenames:
            if name.endswith(".py"):
                try:
                    if keyword in Path(dirpath, name).read_bytes().decode("utf-8"):
                        hits += 1
                except (OSError, UnicodeDecodeError):
                    pass
    return hits


@pytest.fixture(scope="module")
def stdlib_zipimport():
    stats = SourceStats()
    src = SourceConfig(type="python-code", roots=["stdlib"], keywords=["zipimport"])
    return list(iter_documents(src, WHERE, stats)), stats


def test_python_code_source_keeps_files_with_a_keyword(stdlib_zipimport):
    docs, stats = stdlib_zipimport
    assert docs and all("zipimport" in d for d in docs)
    assert len(docs) == stats.documents == stats.files_kept == _reference_stdlib_hits("zipimport")
    assert stats.files_seen > 500  # the whole standard library was walked
    assert stats.files_kept + stats.filtered_out + len(stats.undecodable) <= stats.files_seen
    assert stats.filtered_out > stats.files_kept
    assert stats.bytes_kept == sum(len(d.encode()) for d in docs)
    assert stats.bytes_seen > stats.bytes_kept > 0
    assert "site-packages" not in "".join(stats.undecodable)
    summary = stats.summary("python-code")
    assert f"{len(docs)} documents" in summary and f"of {stats.files_seen:,} files" in summary and "MB" in summary


def test_python_code_source_keyword_mode_none():
    stats = SourceStats()
    src = SourceConfig(type="python-code", roots=["stdlib"], keywords=["import"], keyword_mode="none",
                       max_documents=5)
    docs = list(iter_documents(src, WHERE, stats))
    assert len(docs) == 5 and all("import" not in d and d.strip() for d in docs)
    assert stats.filtered_out > 0 and stats.files_kept == 5


def test_python_code_default_keywords_are_the_course_libraries():
    assert SourceConfig(type="python-code").keywords == ["pandas", "sklearn", "matplotlib", "seaborn"]


# --------------------------------------------------------------------------------------------------
# Splits and fingerprints


def test_split_train_validation_is_seeded_disjoint_and_complete():
    texts = [f"document {i}" for i in range(50)]
    train, val = split_train_validation(texts, 0.2, seed=7)
    assert len(val) == 10 and len(train) == 40
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(texts)
    assert train == [t for t in texts if t in set(train)]  # order kept
    assert split_train_validation(texts, 0.2, seed=7) == (train, val)  # same seed, same split
    assert split_train_validation(list(texts), 0.2, seed=8)[1] != val  # another seed, another split
    vals = {tuple(split_train_validation(texts, 0.2, seed=s)[1]) for s in range(10)}
    assert len(vals) == 10


def test_split_with_duplicate_documents_is_by_position():
    texts = ["same"] * 6 + ["other"] * 4
    train, val = split_train_validation(texts, 0.3, seed=0)
    assert len(train) == 7 and len(val) == 3
    assert sorted(train + val) == sorted(texts)


@pytest.mark.parametrize(("n", "fraction", "n_val"), [(2, 0.1, 1), (3, 0.99, 2), (1000, 0.001, 1), (10, 0.5, 5)])
def test_split_sizes(n, fraction, n_val):
    train, val = split_train_validation([str(i) for i in range(n)], fraction, seed=1)
    assert len(val) == n_val and len(train) == n - n_val


@pytest.mark.parametrize("n", [0, 1])
def test_split_needs_two_documents(n):
    with pytest.raises(InputError, match=rf"only {n} document"):
        split_train_validation(["only"] * n, 0.1, seed=0)


def test_fingerprint_texts():
    texts = [f"text number {i}" for i in range(20)]
    fp = fingerprint_texts(texts)
    assert fp == fingerprint_texts(list(texts)) == fingerprint_texts(iter(texts))  # stable
    assert fp != fingerprint_texts(texts, salt="x")
    seen = {fp}
    for i in range(len(texts)):  # any one text changed, even by one character
        changed = list(texts)
        changed[i] = changed[i] + " "
        seen.add(fingerprint_texts(changed))
    assert len(seen) == len(texts) + 1
    assert fp != fingerprint_texts(texts[::-1])
    assert fp != fingerprint_texts(texts + [""])
    assert fingerprint_texts(["ab", "c"]) != fingerprint_texts(["a", "bc"]) != fingerprint_texts(["abc"])


def test_equal_corpora_share_a_fingerprint(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y"}])
    (tmp_path / "b.txt").write_text("x\ny\n")
    a = load_corpus(SourceConfig(path=str(tmp_path / "a.jsonl")), WHERE)
    b = load_corpus(SourceConfig(path=str(tmp_path / "b.txt"), txt_unit="line"), WHERE)
    assert a.texts == b.texts and a.fingerprint == b.fingerprint == fingerprint_texts(["x", "y"])


# --------------------------------------------------------------------------------------------------
# Bad input: one sentence naming the file, the line and the field


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    msg = error_of(missing)
    assert str(missing) in msg and "does not exist" in msg


def test_glob_matching_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    pattern = str(tmp_path / "*.jsonl")
    msg = error_of(pattern)
    assert pattern in msg and "matches no file" in msg


def test_folder_without_supported_files(tmp_path):
    folder = tmp_path / "blobs"
    folder.mkdir()
    (folder / "x.bin").write_bytes(b"\x00")
    msg = error_of(folder)
    assert str(folder) in msg and "no supported file" in msg and ".jsonl" in msg


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    msg = error_of(folder)
    assert str(folder) in msg and "holds no supported file" in msg


@pytest.mark.parametrize("name", ["sheet.xlsx", "data.xml", "archive.gz"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"PK")
    msg = error_of(path)
    assert name in msg and "unsupported type" in msg and ".csv" in msg
    assert f"'{Path(name).suffix}'" in msg if name != "archive.gz" else "'(none)'" in msg


def test_unsupported_file_matched_by_a_glob(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.docx").write_text("y")
    msg = error_of(tmp_path / "*")
    assert "b.docx" in msg and "'.docx'" in msg


@pytest.mark.parametrize("name", ["broken.txt.gz", "broken.jsonl.gz", "broken.parquet.gz"])
def test_corrupt_gzip(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not gzip data")
    msg = error_of(path)
    assert name in msg and "cannot read" in msg


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 not really")
    msg = error_of(path)
    assert "bad.parquet" in msg and "not a readable Parquet file" in msg


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n{"text": "d"}\n')
    msg = error_of(path)
    assert "line 3" in msg and "broken.jsonl" in msg and "not valid JSON" in msg


def test_truncated_json_file(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1)[:-8])
    msg = error_of(path)
    assert "cut.json" in msg and "not valid JSON" in msg and "line" in msg


@pytest.mark.parametrize("content", [{"rows": [{"text": "a"}]}, "just a string", 42, {"data": "not a list"}])
def test_json_that_is_not_a_list_of_records(tmp_path, content):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps(content))
    msg = error_of(path)
    assert "obj.json" in msg and "list of records" in msg


def test_missing_text_field_lists_the_available_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"title": "t", "body": "b"}] * 2)
    msg = error_of(path)
    assert "'text'" in msg and "line 1" in msg and "d.jsonl" in msg and "title, body" in msg

    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "ok"}, {"title": "t", "body": "b"}]))
    msg = error_of(path)
    assert "'text'" in msg and "record 1" in msg and "d.json" in msg and "title, body" in msg

    msg = error_of(write_jsonl(tmp_path / "eli5.jsonl", ELI5_RECORDS), text_field="answers.txt")
    assert "'answers.txt'" in msg and "q_id, title, answers" in msg


def test_missing_column_in_csv_and_parquet(tmp_path):
    path = write_csv(tmp_path / "d.csv", [["title", "body"], ["a", "b"]])
    msg = error_of(path)
    assert "d.csv" in msg and "'text'" in msg and "title, body" in msg

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"title": ["a"], "body": ["b"]}), path)
    msg = error_of(path, text_field="content")
    assert "d.parquet" in msg and "'content'" in msg and "title, body" in msg


@pytest.mark.parametrize(("value", "kind"), [(3, "int"), (2.5, "float"), ({"en": "hi"}, "dict"), (True, "bool"),
                                             (["ok", {"nested": 1}], "dict")])
def test_text_field_of_the_wrong_type(tmp_path, value, kind):
    path = write_jsonl(tmp_path / "typed.jsonl", [{"text": "fine"}, {"text": value}])
    msg = error_of(path)
    assert "typed.jsonl" in msg and "line 2" in msg and "'text'" in msg and kind in msg and "not text" in msg


def test_text_column_of_the_wrong_type_in_parquet(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "n": [1, 2, 3]}), path)
    msg = error_of(path, text_field="n")
    assert "n.parquet" in msg and "'n'" in msg and "int" in msg and "row 0" in msg


def test_ragged_csv_row(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("id,text\n1,fine\n2,also fine\n3,oops,extra\n4,fine\n")
    msg = error_of(path)
    assert "ragged.csv" in msg and "line 4" in msg and "3 fields" in msg and "2" in msg


def test_record_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n')
    msg = error_of(path)
    assert "line 2" in msg and "d.jsonl" in msg and "list" in msg and "object" in msg

    path = tmp_path / "strings.json"
    path.write_text(json.dumps(["just", "strings"]))
    msg = error_of(path)
    assert "record 0" in msg and "strings.json" in msg and "str" in msg and "object" in msg


def test_empty_corpus_after_the_keyword_filter(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "numpy"}, {"text": "scipy"}])
    msg = error_of(path, keywords=["pandas"])
    assert "empty after the keyword filter" in msg and "2 removed by the keyword filter" in msg


def test_empty_corpus_of_blank_files(tmp_path):
    (tmp_path / "blank.txt").write_text("\n \n")
    msg = error_of(tmp_path)
    assert "corpus is empty" in msg and "after the keyword filter" not in msg


def test_match_filters_records_in_every_table_format(tmp_path):
    import csv as _csv

    import pyarrow as _pa
    import pyarrow.parquet as _pq

    rows = [{"text": f"t{i}", "split": "train" if i % 2 else "test", "label": i % 3} for i in range(9)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with open(tmp_path / "b.csv", "w", newline="") as fh:
        writer = _csv.DictWriter(fh, fieldnames=["text", "split", "label"])
        writer.writeheader()
        writer.writerows(rows)
    _pq.write_table(_pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    want = [r["text"] for r in rows if r["split"] == "train" and r["label"] == 1]
    for name in ("a.jsonl", "b.csv", "c.parquet"):
        got = load_corpus(SourceConfig(path=str(tmp_path / name), match={"split": "train", "label": 1}), "d").texts
        assert got == want, name
    with pytest.raises(InputError, match="no field 'nope' named in match"):
        load_corpus(SourceConfig(path=str(tmp_path / "a.jsonl"), match={"nope": 1}), "d")

"""Sources read real files in every supported format; bad input names the file, line and field."""

from __future__ import annotations

import gzip
import json

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
    text_of,
)
from lmtune.errors import InputError


def docs_of(**kw) -> list[str]:
    return load_corpus(SourceConfig(**kw), "data.train").texts


def error_of(**kw) -> str:
    with pytest.raises(InputError) as exc:
        load_corpus(SourceConfig(**kw), "data.train")
    return str(exc.value)


def test_txt_units(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first line\nsecond line\n\n\nthird para\nstill third\n")
    assert docs_of(path=str(p)) == [p.read_text()]
    assert docs_of(path=str(p), txt_unit="line") == ["first line", "second line", "third para", "still third"]
    assert docs_of(path=str(p), txt_unit="paragraph") == ["first line\nsecond line", "third para\nstill third"]


def test_table_formats_with_text_field(tmp_path):
    rows = [{"body": f"doc {i}", "n": i} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "d.csv").write_text("n,body\n" + "".join(f'{r["n"]},"{r["body"]}"\n' for r in rows))
    (tmp_path / "e.tsv").write_text("n\tbody\n" + "".join(f'{r["n"]}\t{r["body"]}\n' for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "f.parquet")
    with gzip.open(tmp_path / "g.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))
    want = [r["body"] for r in rows]
    for name in ("a.jsonl", "b.json", "c.json", "d.csv", "e.tsv", "f.parquet", "g.jsonl.gz"):
        assert docs_of(path=str(tmp_path / name), text_field="body") == want, name


def test_nested_list_field_is_flattened_and_joined(tmp_path):
    rows = [{"answers": {"text": ["a b", "c"], "score": [1, 2]}}, {"answers": {"text": ["only"], "score": [3]}}]
    (tmp_path / "eli5.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert docs_of(path=str(tmp_path / "eli5.jsonl"), text_field="answers.text") == ["a b c", "only"]
    assert get_field({"a": [{"b": "x"}, {"b": "y"}]}, "a.b") == ["x", "y"]
    assert text_of([["a", "b"], "c", None]) == "a b c"


def test_folders_globs_and_max_documents(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "sub" / "1.txt").write_text("one")
    (tmp_path / "sub" / "deep" / "2.txt").write_text("two")
    (tmp_path / "sub" / "ignored.bin").write_bytes(b"\x00\x01")
    assert sorted(docs_of(path=str(tmp_path / "sub"))) == ["one", "two"]
    assert docs_of(path=str(tmp_path / "sub" / "**" / "*.txt")) == ["one", "two"]
    assert docs_of(path=[str(tmp_path / "sub" / "1.txt"), str(tmp_path / "sub" / "1.txt")]) == ["one"]
    assert len(docs_of(path=str(tmp_path / "sub"), max_documents=1)) == 1


def test_keyword_filter_modes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("import pandas\nplain text\nsklearn here\n")
    assert docs_of(path=str(p), txt_unit="line", keywords=["pandas", "sklearn"]) == ["import pandas", "sklearn here"]
    assert docs_of(path=str(p), txt_unit="line", keywords=["pandas", "sklearn"], keyword_mode="none") == [
        "plain text"]


def test_undecodable_input_is_skipped_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    corpus = load_corpus(SourceConfig(path=str(tmp_path)), "data.train")
    assert corpus.texts == ["fine"] and len(corpus.stats.undecodable) == 1
    assert "bad.txt" in corpus.stats.summary("x") and "not UTF-8" in corpus.stats.summary("x")
    j = tmp_path / "lines.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "ok2"}\n')
    corpus = load_corpus(SourceConfig(path=str(j)), "data.train")
    assert corpus.texts == ["ok", "ok2"] and corpus.stats.undecodable == ["lines.jsonl:2"]


def test_python_code_source_harvests_and_filters():
    stats = SourceStats()
    src = SourceConfig(type="python-code", roots=["stdlib"], keywords=["asyncio"], max_documents=20)
    docs = list(iter_documents(src, "data.train", stats))
    assert len(docs) == 20 and all("asyncio" in d for d in docs)
    assert stats.files_seen >= stats.files_kept == 20 and stats.bytes_seen >= stats.bytes_kept > 0
    assert "of" in stats.summary("python-code") and "MB" in stats.summary("python-code")


def test_seeded_split():
    texts = [f"d{i}" for i in range(50)]
    a_train, a_val = split_train_validation(texts, 0.2, seed=1)
    b_train, b_val = split_train_validation(texts, 0.2, seed=1)
    c_train, c_val = split_train_validation(texts, 0.2, seed=2)
    assert (a_train, a_val) == (b_train, b_val) and a_val != c_val
    assert len(a_val) == 10 and sorted(a_train + a_val) == sorted(texts) and not set(a_train) & set(a_val)
    with pytest.raises(InputError, match="cannot hold out"):
        split_train_validation(["only"], 0.1, 0)


def test_fingerprint():
    assert fingerprint_texts(["a", "b"]) == fingerprint_texts(["a", "b"])
    assert fingerprint_texts(["a", "b"]) != fingerprint_texts(["ab"])
    assert fingerprint_texts(["a", "b"]) != fingerprint_texts(["a", "c"])


@pytest.mark.parametrize("name,content,kw,fragments", [
    ("bad.jsonl", '{"text": "a"}\n{"text": \n{"text": "c"}\n', {}, ["line 2", "bad.jsonl", "not valid JSON"]),
    ("trunc.json", '[{"text": "a"}, {"te', {}, ["trunc.json", "not valid JSON"]),
    ("nofield.jsonl", '{"body": "a", "id": 1}\n', {}, ["no field 'text'", "fields: body, id", "line 1"]),
    ("num.jsonl", '{"text": 5}\n', {}, ["is a int", "line 1"]),
    ("dict.jsonl", '{"text": {"a": 1}}\n', {}, ["is a dict"]),
    ("list.jsonl", '[1, 2]\n', {}, ["line 1", "not an object"]),
    ("ragged.csv", 'text,n\n"a",1\n"b",2,3\n', {}, ["ragged.csv", "line 3", "3 fields", "2"]),
    ("nocol.csv", 'body\nx\n', {}, ["no column 'text'", "body"]),
    ("scalar.json", '"just a string"', {}, ["list of records"]),
    ("kw.txt", "nothing relevant", {"keywords": ["zzz"]}, ["empty after the keyword filter"]),
    ("empty.txt", "   \n", {}, ["corpus is empty"]),
    ("data.xml", "<a/>", {}, ["unsupported type '.xml'"]),
])
def test_bad_input_names_file_line_and_fix(tmp_path, name, content, kw, fragments):
    path = tmp_path / name
    path.write_text(content)
    message = error_of(path=str(path), **kw)
    assert message.startswith("data.train")
    for fragment in fragments:
        assert fragment in message, message


def test_missing_paths(tmp_path):
    assert "does not exist" in error_of(path=str(tmp_path / "nope.jsonl"))
    assert "matches no file" in error_of(path=str(tmp_path / "*.jsonl"))
    (tmp_path / "empty").mkdir()
    assert "holds no supported file" in error_of(path=str(tmp_path / "empty"))

"""Streaming pretraining data: documents read lazily with positions (every file type, the Hub through a
local datasets.IterableDataset), blocks equal to the in-memory packing, the windowed shuffle, exact
resumption without re-reading the prefix, a tokenizer trained on the start of a stream, and a tiny
`lmtune train` run with a streamed corpus and a tokenizer trained on it."""

from __future__ import annotations

import gzip
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from lmtune.cli import main
from lmtune.config import SourceConfig, validate_recipe
from lmtune.data.packing import StreamingBlockDataset, pack, tokenize_texts
from lmtune.data.sources import load_corpus
from lmtune.data.streaming import SNAPSHOT_EVERY, DocumentStream, first_bytes
from lmtune.errors import InputError

from ..helpers import make_documents, with_changes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WHERE = "data.train"
LINE_ENDS = ["\n", "\r\n", "\r", "\n  \n", "\n\t\n\n"]
PARAGRAPH_ENDS = ["\n\n", "\r\n\r\n", "\n \t\n", "\r\r", "\n\n\n"]


# --------------------------------------------------------------------------------------------------
# Corpora of every kind, written to real files


def documents(n: int, seed: int) -> list[str]:
    return make_documents(n, seed=seed, min_words=1, max_words=70)


def write_numbered_docs(path: Path, docs: list[str]) -> Path:
    lines = (json.dumps({"id": i, "part": i % 2, "text": t}) + "\n" for i, t in enumerate(docs))
    path.write_text("".join(lines), encoding="utf-8")
    return path


def gzip_copy(path: Path) -> Path:
    gz = path.with_name(path.name + ".gz")
    gz.write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    return gz


def write_lines(path: Path, docs: list[str]) -> Path:
    """One document per line, with every kind of line break and blank lines between them; a BOM first."""
    text = "\ufeff" + "".join(d + LINE_ENDS[i % len(LINE_ENDS)] for i, d in enumerate(docs))
    path.write_bytes(text.encode("utf-8"))
    return path


def paragraphs_of(docs: list[str]) -> list[str]:
    """Documents as paragraphs of one to three lines."""
    out = []
    for i, d in enumerate(docs):
        words = d.split(" ")
        k = 1 + i % 3
        out.append("\n".join(" ".join(words[j::k]) for j in range(k) if words[j::k]))
    return out


def write_paragraphs(path: Path, docs: list[str]) -> Path:
    text = ""
    for i, para in enumerate(paragraphs_of(docs)):
        lines = para.split("\n")
        inner = "\r\n" if i % 4 == 1 else "\r" if i % 4 == 2 else "\n"
        text += inner.join(lines) + PARAGRAPH_ENDS[i % len(PARAGRAPH_ENDS)]
    path.write_bytes(text.encode("utf-8"))
    return path


def write_csv(path: Path, docs: list[str]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text"])
        writer.writerows([i, d if i % 5 else d + '\n"quoted", line'] for i, d in enumerate(docs))
    return path


def make_source(kind: str, folder: Path, n: int = 160, seed: int = 0) -> tuple[SourceConfig, object]:
    """A source of `kind` over n documents in `folder` (and a datasets factory for 'hub')."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = documents(n, seed)
    factory = None
    if kind == "jsonl":
        src = SourceConfig(path=str(write_numbered_docs(folder / "d.jsonl", docs)))
    elif kind == "jsonl.gz":
        src = SourceConfig(path=str(gzip_copy(write_numbered_docs(folder / "d.jsonl", docs))))
    elif kind == "txt-line":
        src = SourceConfig(path=str(write_lines(folder / "d.txt", docs)), txt_unit="line")
    elif kind == "txt.gz-line":
        src = SourceConfig(path=str(gzip_copy(write_lines(folder / "d.txt", docs))), txt_unit="line")
    elif kind == "txt-paragraph":
        src = SourceConfig(path=str(write_paragraphs(folder / "d.txt", docs)), txt_unit="paragraph")
    elif kind == "txt-file":
        for i in range(0, n, 8):
            (folder / f"f{i:04d}.txt").write_text("\n".join(docs[i : i + 8]) + "\n")
        src = SourceConfig(path=str(folder), txt_unit="file")
    elif kind == "csv":
        src = SourceConfig(path=str(write_csv(folder / "d.csv", docs)))
    elif kind == "json":
        (folder / "d.json").write_text(json.dumps({"data": [{"text": d} for d in docs]}))
        src = SourceConfig(path=str(folder / "d.json"))
    elif kind == "parquet":
        pq.write_table(pa.table({"text": docs, "n": list(range(n))}), folder / "d.parquet", row_group_size=23)
        src = SourceConfig(path=str(folder / "d.parquet"))
    elif kind == "several-files":  # a glob over jsonl, gzipped jsonl and txt
        write_numbered_docs(folder / "a.jsonl", docs[: n // 3])
        gzip_copy(write_numbered_docs(folder / "b.jsonl", docs[n // 3 : 2 * n // 3]))
        write_numbered_docs(folder / "c.jsonl", docs[2 * n // 3 :])
        src = SourceConfig(path=[str(folder / "*.jsonl"), str(folder / "*.jsonl.gz")])
    elif kind == "keywords":
        src = SourceConfig(path=str(write_numbered_docs(folder / "d.jsonl", docs)), keywords=["model", "numpy"])
    elif kind == "match-max-documents":
        src = SourceConfig(path=str(write_numbered_docs(folder / "d.jsonl", docs)), match={"part": 0},
                           max_documents=n // 2 - 5)
    elif kind == "hub":
        import datasets

        src = SourceConfig(type="hub", path="local/demo")

        def make_iterable():
            return datasets.Dataset.from_dict({"text": docs, "n": list(range(n))}).to_iterable_dataset(num_shards=3)

        factory = make_iterable
    else:
        raise ValueError(kind)
    return src, factory


def expected_texts(src: SourceConfig, factory) -> list[str]:
    if factory is not None:
        return [r["text"] for r in factory()]
    return load_corpus(src, WHERE).texts


KINDS = ["jsonl", "jsonl.gz", "txt-line", "txt.gz-line", "txt-paragraph", "txt-file", "csv", "json", "parquet",
         "several-files", "keywords", "match-max-documents", "hub"]


def stream_of(src, factory=None, shuffle_files=False, seed=0) -> DocumentStream:
    return DocumentStream(src, WHERE, seed=seed, shuffle_files=shuffle_files, dataset_factory=factory)


def blocks_of(ds, limit=None) -> list[np.ndarray]:
    items = ds if limit is None else itertools.islice(ds, limit)
    out = []
    for item in items:
        assert item["input_ids"].dtype == torch.int64 and item["input_ids"] is item["labels"]
        out.append(item["input_ids"].numpy())
    return out


# --------------------------------------------------------------------------------------------------
# The reader: the same documents as the in-memory sources, and positions that restart exactly


@pytest.mark.parametrize("kind", KINDS)
def test_stream_documents_equal_the_in_memory_corpus(tmp_path, kind):
    src, factory = make_source(kind, tmp_path)
    stream = stream_of(src, factory)
    got = [text for _, text in stream.documents(0)]
    assert got == expected_texts(src, factory) and len(got) > 5


@pytest.mark.parametrize("kind", KINDS)
def test_every_document_position_restarts_exactly_there(tmp_path, kind):
    src, factory = make_source(kind, tmp_path, n=300 if kind == "hub" else 60)
    stream = stream_of(src, factory, shuffle_files=True, seed=3)
    docs = list(stream.documents(1))
    texts = [t for _, t in docs]
    step = 7 if kind != "hub" else 37
    for i in [*range(0, len(docs), step), len(docs) - 1]:
        state = json.loads(json.dumps(stream.position(docs[i][0])))  # JSON round trip
        again = stream_of(src, factory, shuffle_files=True, seed=3)
        rest = [t for _, t in again.documents(1, state)]
        assert rest == texts[i:], (kind, i)


def test_positions_of_text_lines_seek_instead_of_reading_from_the_start(tmp_path):
    for kind in ("txt-line", "jsonl", "txt-paragraph", "jsonl.gz"):
        src, _ = make_source(kind, tmp_path / kind, n=400)
        docs = list(stream_of(src).documents(0))
        again = stream_of(src)
        start = again.position(docs[300][0])
        first = next(again.documents(0, start))
        assert first[1] == docs[300][1]
        assert again.records_parsed <= 3, kind  # the line it starts at (and a blank one or two)


def test_hub_stream_resumes_from_the_datasets_state_dict(tmp_path):
    src, factory = make_source("hub", tmp_path, n=3 * SNAPSHOT_EVERY + 50)
    docs = list(stream_of(src, factory).documents(0))
    state = stream_of(src, factory).position(docs[2 * SNAPSHOT_EVERY + 40][0])
    assert state["state"] is not None and state["state_at"] == 2 * SNAPSHOT_EVERY
    again = stream_of(src, factory)
    assert next(again.documents(0, state))[1] == docs[2 * SNAPSHOT_EVERY + 40][1]
    assert again.records_parsed == 41  # replayed from the snapshot, not from record 0
    # two iterations over the same dataset object: positions stay exact (the older takes no more snapshots)
    both = stream_of(src, factory)
    first = both.documents(0)
    head = list(itertools.islice(first, SNAPSHOT_EVERY + 10))
    list(itertools.islice(both.documents(0), 5))
    tail = list(first)
    assert [t for _, t in head + tail] == [t for _, t in docs]
    for pos, text in (tail[0], tail[SNAPSHOT_EVERY + 3], tail[-1]):
        assert next(stream_of(src, factory).documents(0, both.position(pos)))[1] == text


def test_undecodable_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "good one"}\n{"text": "bad \xff"}\n{"text": "good two"}\n')
    text = tmp_path / "d.txt"
    text.write_bytes(b"line one\nbad \xfe line\nline two\n")
    for p, expected in ((path, ["good one", "good two"]), (text, ["line one", "line two"])):
        stream = stream_of(SourceConfig(path=str(p), txt_unit="line"))
        assert [t for _, t in stream.documents(0)] == expected
        assert stream.undecodable == 1


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(InputError, match="line 2 of .*not valid JSON"):
        list(stream_of(SourceConfig(path=str(path))).documents(0))


# --------------------------------------------------------------------------------------------------
# Blocks: the in-memory packing, shuffled in windows


def in_memory_blocks(texts, tokenizer, block_size, mode):
    return pack(list(tokenize_texts(tokenizer, texts)), block_size, mode, tokenizer.eos_token_id)


@pytest.mark.parametrize("mode", ["concat", "overflow"])
@pytest.mark.parametrize("kind", ["jsonl", "txt-paragraph", "jsonl.gz", "keywords", "several-files", "hub"])
def test_unshuffled_stream_equals_the_in_memory_packing(tmp_path, tiny_tokenizer, kind, mode):
    src, factory = make_source(kind, tmp_path, n=200)
    expected = in_memory_blocks(expected_texts(src, factory), tiny_tokenizer, 12, mode)
    ds = StreamingBlockDataset(stream_of(src, factory), tiny_tokenizer, 12, mode, shuffle_buffer=0, epochs=1)
    got = blocks_of(ds)
    assert len(got) == len(expected) > 50
    assert np.array_equal(np.stack(got), expected)


def test_a_shuffled_epoch_is_a_permutation_and_seeded(tmp_path, tiny_tokenizer):
    src, _ = make_source("jsonl", tmp_path, n=200)
    expected = in_memory_blocks(expected_texts(src, None), tiny_tokenizer, 12, "concat")

    def epochs(seed, n=2):
        ds = StreamingBlockDataset(stream_of(src, seed=seed), tiny_tokenizer, 12, "concat", shuffle_buffer=50,
                                   seed=seed, epochs=n)
        return np.stack(blocks_of(ds))

    first = epochs(1)
    n = len(expected)
    assert len(first) == 2 * n
    for epoch in (first[:n], first[n:]):
        assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, expected.tolist()))  # a permutation
        assert not np.array_equal(epoch, expected)
    assert not np.array_equal(first[:n], first[n:])  # each epoch its own order
    # within a window only: the first 50 blocks are the first 50 of the stream, shuffled
    assert sorted(map(tuple, first[:50].tolist())) == sorted(map(tuple, expected[:50].tolist()))
    assert np.array_equal(epochs(1), first)  # same seed, same order
    assert not np.array_equal(epochs(2), first)


def test_files_are_read_in_a_new_order_each_epoch(tmp_path, tiny_tokenizer):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(8):
        write_numbered_docs(folder / f"part{i}.jsonl", documents(20, seed=i))
    src = SourceConfig(path=str(folder))
    stream = stream_of(src, shuffle_files=True, seed=5)
    orders = [stream.file_order(e).tolist() for e in range(3)]
    assert all(sorted(o) == list(range(8)) for o in orders) and orders[0] != orders[1]
    texts = [t for _, t in stream.documents(1)]
    by_file = [expected_texts(SourceConfig(path=str(p)), None) for p in stream.files()]
    assert texts == [t for i in orders[1] for t in by_file[i]]


# --------------------------------------------------------------------------------------------------
# Resuming: resume_from(position_state(k)) yields blocks k, k+1, ... of the uninterrupted stream


WINDOW = 40


def make_dataset(src, factory, tokenizer, mode="concat", shuffle_buffer=WINDOW, epochs=3, seed=11):
    stream = stream_of(src, factory, shuffle_files=shuffle_buffer > 0, seed=seed)
    return StreamingBlockDataset(stream, tokenizer, 12, mode, shuffle_buffer=shuffle_buffer, seed=seed, epochs=epochs)


def check_resumes(src, factory, tokenizer, mode="concat", shuffle_buffer=WINDOW):
    ds = make_dataset(src, factory, tokenizer, mode, shuffle_buffer)
    full = blocks_of(ds)
    per_epoch = len(full) // 3
    w = shuffle_buffer or 1024
    ks = [0, 1, w - 1, w, w + 1, 2 * w + 7, per_epoch - 1, per_epoch, per_epoch + 3, 2 * per_epoch + w // 2,
          len(full) - 1, len(full)]
    for k in sorted({k for k in ks if 0 <= k <= len(full)}):
        state = json.loads(json.dumps(ds.position_state(k)))
        assert len(json.dumps(state)) < 2000
        again = make_dataset(src, factory, tokenizer, mode, shuffle_buffer)
        again.resume_from(state)
        want = full[k : k + w + 5] if k != 0 else full  # across the next window's start; all of it once
        got = blocks_of(again, len(want))
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want)), (k, per_epoch)
    return full


@pytest.mark.parametrize("kind", KINDS)
def test_resume_yields_exactly_the_following_blocks(tmp_path, tiny_tokenizer, kind):
    src, factory = make_source(kind, tmp_path, n=100)
    full = check_resumes(src, factory, tiny_tokenizer)
    assert len(full) >= 3 * 2 * WINDOW  # at least two windows an epoch


@pytest.mark.parametrize(("mode", "shuffle_buffer"), [("overflow", WINDOW), ("concat", 0), ("overflow", 0)])
def test_resume_in_every_mode(tmp_path, tiny_tokenizer, mode, shuffle_buffer):
    src, _ = make_source("txt-paragraph", tmp_path, n=100)
    check_resumes(src, None, tiny_tokenizer, mode, shuffle_buffer)


def test_position_state_does_not_depend_on_how_far_the_iterator_read(tmp_path, tiny_tokenizer):
    src, _ = make_source("jsonl", tmp_path, n=100)
    full = blocks_of(make_dataset(src, None, tiny_tokenizer))
    for k in (WINDOW, WINDOW + 9, 3 * WINDOW):
        ahead = make_dataset(src, None, tiny_tokenizer)
        blocks_of(ahead, k)  # read exactly k blocks: the generator stops right after block k - 1
        again = make_dataset(src, None, tiny_tokenizer)
        again.resume_from(ahead.position_state(k))
        assert all(np.array_equal(a, b) for a, b in zip(blocks_of(again, 2 * WINDOW), full[k:]))


def test_resume_reads_one_window_not_the_prefix(tmp_path, tiny_tokenizer):
    for kind in ("jsonl", "jsonl.gz"):
        src, _ = make_source(kind, tmp_path / kind, n=3000)
        ds = make_dataset(src, None, tiny_tokenizer, epochs=1)
        total = len(blocks_of(ds))
        k = int(0.8 * total) // WINDOW * WINDOW + 13
        again = make_dataset(src, None, tiny_tokenizer, epochs=1)
        again.resume_from(ds.position_state(k))
        next(iter(again))
        # one window of 40 blocks of 12 tokens is a few documents, tokenized in one batch (<= 256 of them),
        # where the first k blocks took ~2,400
        assert again.documents_tokenized <= 256 and ds.documents_tokenized == 3000, kind
        assert again.stream.records_parsed <= 256, kind  # the reader seeked to the window's first line


def test_resume_refuses_a_position_saved_with_other_settings(tmp_path, tiny_tokenizer):
    src, _ = make_source("jsonl", tmp_path, n=60)
    state = make_dataset(src, None, tiny_tokenizer).position_state(5)
    other = StreamingBlockDataset(stream_of(src), tiny_tokenizer, 16, "concat", shuffle_buffer=WINDOW)
    with pytest.raises(InputError, match="other data or settings"):
        other.resume_from(state)
    with pytest.raises(InputError, match="not one this version"):
        other.resume_from({"blocks": 5})


def test_dataloader_workers_are_refused(tmp_path, tiny_tokenizer):
    src, _ = make_source("jsonl", tmp_path, n=30)
    ds = make_dataset(src, None, tiny_tokenizer, epochs=1)
    batches = list(itertools.islice(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0), 2))
    assert [b["input_ids"].shape for b in batches] == [(4, 12), (4, 12)]
    with pytest.raises(RuntimeError, match="num_workers=0"):
        next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)))


def test_a_stream_without_a_full_block_is_refused(tmp_path, tiny_tokenizer):
    path = write_numbered_docs(tmp_path / "d.jsonl", ["tiny"])
    ds = StreamingBlockDataset(stream_of(SourceConfig(path=str(path))), tiny_tokenizer, 64, "concat",
                               shuffle_buffer=8, epochs=None)
    with pytest.raises(InputError, match="no full block of 64 tokens"):
        ds.check_not_empty()
    with pytest.raises(InputError, match="no full block of 64 tokens"):
        next(iter(ds))  # and not an endless loop over empty epochs


# --------------------------------------------------------------------------------------------------
# A tokenizer trained on the start of the stream


def streaming_recipe(data: Path, **changes) -> dict:
    return with_changes({
        "task": "clm",
        "name": "stream",
        "tokenizer": {"train": True, "vocab_size": 400, "min_frequency": 1},
        "model": {"from_scratch": {"n_layer": 1, "n_head": 2, "n_embd": 32}},
        "data": {"train": {"path": str(data), "streaming": True},
                 "validation": {"path": str(data), "max_documents": 30}, "block_size": 32, "shuffle_buffer": 64},
        "training": {"learning_rate": 3e-3, "batch_size": 8, "max_steps": 25, "precision": "fp32",
                     "save_strategy": "no", "logging_steps": 5},
    }, changes)


def test_first_bytes_stops_at_the_budget():
    pulled = []

    def docs():
        for text in ["aaaa", "é" * 10, "bbbb", "cccc"]:
            pulled.append(text)
            yield text

    counts = {}
    assert list(first_bytes(docs(), 10, counts)) == ["aaaa", "ééé"]
    assert counts == {"documents": 2, "bytes": 10} and len(pulled) == 2  # stops pulling at the budget


def test_tokenizer_trained_on_a_stream_reads_only_its_byte_budget(tmp_path):
    from lmtune.tasks.clm import stream_tokenizer

    data = write_numbered_docs(tmp_path / "d.jsonl", documents(2000, seed=4))
    budget = 20_000
    cfg = validate_recipe(streaming_recipe(data, **{"tokenizer.max_training_bytes": budget}))
    stream = stream_of(cfg.data.train, shuffle_files=True, seed=cfg.training.seed)
    tokenizer = stream_tokenizer(cfg, stream)
    texts = [t for _, t in stream_of(cfg.data.train, shuffle_files=True, seed=cfg.training.seed).documents(0)]
    sizes = np.cumsum([len(t.encode()) for t in texts])
    needed = int(np.searchsorted(sizes, budget)) + 1  # documents that hold the first `budget` bytes
    assert stream.records_parsed == needed < len(texts) / 10
    assert len(tokenizer) <= 400 and tokenizer.eos_token_id is not None
    again = stream_of(cfg.data.train, shuffle_files=True, seed=cfg.training.seed)
    assert stream_tokenizer(cfg, again).get_vocab() == tokenizer.get_vocab()
    assert again.records_parsed == 0  # cached by the files' paths, sizes and times, and the budget
    cfg2 = validate_recipe(streaming_recipe(data, **{"tokenizer.max_training_bytes": 2 * budget}))
    stream2 = stream_of(cfg2.data.train, shuffle_files=True, seed=cfg.training.seed)
    stream_tokenizer(cfg2, stream2)
    assert stream2.records_parsed > needed  # another budget trains again


def test_streaming_refuses_dataloader_workers(tmp_path):
    from lmtune.tasks.clm import prepare_streaming

    data = write_numbered_docs(tmp_path / "d.jsonl", documents(50, seed=4))
    cfg = validate_recipe(streaming_recipe(data, **{"training.dataloader_num_workers": 2}))
    with pytest.raises(InputError, match="dataloader_num_workers: 0"):
        prepare_streaming(cfg)


def test_streaming_training_with_a_tokenizer_trained_on_the_stream(tmp_path):
    data = write_numbered_docs(tmp_path / "d.jsonl", make_documents(400, seed=7))
    recipe = streaming_recipe(data, **{"tokenizer.max_training_bytes": 30_000})
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert main(["train", str(path), "--output", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 25 and metrics["data"]["streaming"] is True
    assert metrics["data"]["shuffle_buffer"] == 64
    assert metrics["after"]["perplexity"] < metrics["before"]["perplexity"] / 3
    tokenizer = json.loads((run / "model" / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) <= 400
    shutil.rmtree(run)

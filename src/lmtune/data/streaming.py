"""A training source read as a stream: documents lazily, epoch after epoch, each with a position to
restart from without reading what came before it.

The streaming path (``data.train.streaming``) reads this instead of `sources.load_corpus`; the documents
are the same (same fields, filters, order), but memory does not grow with the corpus: files are read a
line, a CSV row or a Parquet batch at a time. The one exception is a ``.json`` file (a single JSON value
has no record boundaries), which is read whole; use JSON Lines for large files.

Positions. Each document comes with a tuple ``(epoch, file, anchor, sub, kept)``:

- ``file`` indexes the epoch's file order (files are shuffled per epoch when asked, seeded by
  ``(seed, epoch)``), ``kept`` counts the documents kept before this one in the epoch (for
  ``max_documents``);
- JSON Lines and text files read by line or paragraph: ``anchor`` is the byte offset of a line where
  parsing can restart with nothing pending, ``sub`` the raw units (sub-lines, paragraphs) between it
  and the document; a gzipped file uses the offset in its decompressed bytes (``GzipFile.seek``
  decompresses up to it but parses nothing);
- CSV / TSV, JSON and Parquet files: ``anchor`` 0 and ``sub`` the record number (CSV rows are
  re-parsed up to it, Parquet skips whole row groups); ``.txt`` read per file and ``python-code``: the
  file alone;
- Hub streams (a ``datasets.IterableDataset``): ``sub`` is the record number in the epoch and
  ``anchor`` the dataset's own ``state_dict()`` taken every `SNAPSHOT_EVERY` records, so resuming
  replays fewer than that many records.

`position()` turns a tuple into a small JSON-serialisable dict and `documents(epoch, start=dict)`
restarts exactly at that document.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.config import SourceConfig
from lmtune.data.sources import (
    CSV_FIELD_LIMIT,
    MAX_RECORD_BYTES,
    TEXT_SUFFIXES,
    SourceStats,
    _record_text,
    check_record_size,
    decode,
    expand_paths,
    is_hub_id,
    keep_by_keywords,
    python_code_roots,
    python_files,
    read_bytes,
    suffix_of,
)
from lmtune.errors import InputError

log = logging.getLogger("lmtune")

SNAPSHOT_EVERY = 256  # Hub streams: records between two copies of the dataset's state_dict
READ_BUFFER = 1 << 20
MAX_UNDECODABLE_NAMED = 20  # the stats keep the first few undecodable items by name, then only count

Position = tuple  # (epoch, file, anchor, sub, kept)


class DocumentStream:
    """The documents of one source (`SourceConfig`), read lazily in epochs, each with its position.

    ``shuffle_files``: each epoch reads the files in an order drawn from ``(seed, epoch)``.
    ``dataset_factory``: for Hub sources, a callable returning the ``datasets`` dataset to stream (the
    default loads ``src.path`` with ``streaming=True``); tests pass a local one."""

    def __init__(self, src: SourceConfig, where: str, seed: int = 0, shuffle_files: bool = False,
                 dataset_factory: Callable[[], Any] | None = None):
        self.src = src
        self.where = where
        self.seed = seed
        self.shuffle_files = shuffle_files
        self.hub = src.type != "python-code" and (dataset_factory is not None or is_hub_id(src))
        self._dataset_factory = dataset_factory
        self._dataset = None
        self._hub_iterations = 0
        self._files: list[Path] | None = None
        self._order: tuple[int, np.ndarray] | None = None
        self._signatures: dict[bool, str] = {}
        self.stats = SourceStats()  # of the epoch being read
        self.undecodable = 0
        self.records_parsed = 0  # raw lines / rows / records parsed, over the stream's life (for tests)

    # ----------------------------------------------------------------------------------------------
    # What is read

    def files(self) -> list[Path]:
        """The source's files, sorted (listing only; raises InputError for a missing path)."""
        if self._files is None:
            if self.hub:
                self._files = []
            elif self.src.type == "python-code":
                self._files = python_files(python_code_roots(self.src.roots))
            else:
                self._files = expand_paths(self.src.paths, self.where)
        return self._files

    def file_order(self, epoch: int) -> np.ndarray:
        n = len(self.files())
        if self._order is None or self._order[0] != epoch:
            order = np.random.default_rng([self.seed % 2**32, epoch]).permutation(n) if self.shuffle_files and n > 1 \
                else np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def signature(self, mtimes: bool = False) -> str:
        """What decides the documents: the source settings and every file's path and size (and
        modification time when asked) -- not their contents, which would mean reading the corpus."""
        if mtimes not in self._signatures:
            src = self.src
            desc: dict[str, Any] = {
                "type": src.type, "text_field": src.text_field, "txt_unit": src.txt_unit, "match": src.match,
                "keywords": src.keywords, "keyword_mode": src.keyword_mode, "max_documents": src.max_documents,
            }
            if self.hub:
                desc["hub"] = [src.paths, src.split, src.config_name]
            else:
                desc["roots"] = src.roots if src.type == "python-code" else None
                files = []
                for p in self.files():
                    try:
                        st = p.stat()
                        files.append([str(p), st.st_size, st.st_mtime_ns if mtimes else 0])
                    except OSError:
                        files.append([str(p), -1, 0])
                desc["files"] = files
            text = json.dumps(desc, sort_keys=True, default=str)
            self._signatures[mtimes] = hashlib.sha256(text.encode()).hexdigest()[:24]
        return self._signatures[mtimes]

    def describe(self) -> str:
        if self.hub:
            return f"{self.where}: streamed from the Hub dataset '{self.src.paths[0]}'"
        files = self.files()
        size = 0
        for p in files:
            try:
                size += p.stat().st_size
            except OSError:
                pass
        return f"{self.where}: streamed from {len(files):,} file(s), {size / 1e6:.1f} MB on disk"

    # ----------------------------------------------------------------------------------------------
    # Documents and positions

    def documents(self, epoch: int, start: dict | None = None) -> Iterator[tuple[Position, str]]:
        """(position, text) for the documents of one epoch, after the keyword filter and up to
        max_documents; from the beginning, or from the document `start` (a `position()` dict) on."""
        if start is None:
            self.stats = SourceStats()
        kept = int(start["kept"]) if start else 0
        limit = self.src.max_documents
        if limit is not None and kept >= limit:
            return
        keywords, mode = self.src.keywords, self.src.keyword_mode
        raw = self._hub_raw(start) if self.hub else self._files_raw(epoch, start)
        for (file, anchor, sub), text in raw:
            if keywords and not keep_by_keywords(text, keywords, mode):
                self.stats.filtered_out += 1
                continue
            pos = (epoch, file, anchor, sub, kept)
            kept += 1
            self.stats.documents += 1
            yield pos, text
            if limit is not None and kept >= limit:
                return

    def position(self, pos: Position) -> dict:
        epoch, file, anchor, sub, kept = pos
        if self.hub:
            state_at, state = anchor
            return {"epoch": int(epoch), "record": int(sub), "kept": int(kept), "state_at": int(state_at),
                    "state": deepcopy(state)}
        path = self.files()[int(self.file_order(epoch)[file])]
        return {"epoch": int(epoch), "file": int(file), "path": str(path), "offset": int(anchor), "sub": int(sub),
                "kept": int(kept)}

    def warn_undecodable(self) -> None:
        if self.undecodable:
            log.warning("%s: skipped %d undecodable (non UTF-8) item(s), first %s", self.where, self.undecodable,
                        self.stats.undecodable[0] if self.stats.undecodable else "?")

    def _undecodable(self, what: str) -> None:
        self.undecodable += 1
        if len(self.stats.undecodable) < MAX_UNDECODABLE_NAMED:
            self.stats.undecodable.append(what)

    # ----------------------------------------------------------------------------------------------
    # Files

    def _files_raw(self, epoch: int, start: dict | None) -> Iterator[tuple[tuple, str]]:
        files, order = self.files(), self.file_order(epoch)
        first = int(start["file"]) if start else 0
        if start and first < len(order) and start.get("path") not in (None, str(files[order[first]])):
            raise InputError(f"{self.where}: the saved stream position names '{start['path']}', but file "
                             f"{first} of epoch {epoch} is now '{files[order[first]]}'; the files changed since "
                             "the checkpoint: resume with the same data or start over with --overwrite.")
        for fi in range(first, len(order)):
            path = files[order[fi]]
            anchor, sub = (int(start["offset"]), int(start["sub"])) if start and fi == first else (0, 0)
            self.stats.files_seen += 1
            any_kept = False
            for a, s, text in self._file_units(path, anchor, sub):
                if a == anchor and s < sub:
                    continue
                if not any_kept:
                    self.stats.files_kept += 1
                    any_kept = True
                yield (fi, a, s), text

    def _file_units(self, path: Path, anchor: int, sub: int) -> Iterator[tuple[int, int, str]]:
        """(anchor, sub, text) of one file's documents before the keyword filter, from `anchor` on; a
        reader may skip the units before `sub` itself (the caller skips them anyway)."""
        suffix = suffix_of(path)
        try:
            if self.src.type == "python-code" or (suffix in TEXT_SUFFIXES and self.src.txt_unit == "file"):
                yield from self._whole_file(path)
            elif suffix in TEXT_SUFFIXES:
                yield from self._text_lines(path, anchor)
            elif suffix in {".jsonl", ".ndjson"}:
                yield from self._jsonl(path, anchor)
            elif suffix in {".csv", ".tsv"}:
                yield from self._csv(path, suffix, sub)
            elif suffix == ".json":
                yield from self._json(path, sub)
            elif suffix == ".parquet":
                yield from self._parquet(path, sub)
            else:  # expand_paths admits only supported suffixes
                raise InputError(f"{self.where}: '{path}' has an unsupported type '{suffix}'.")
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{self.where}: cannot read '{path}' ({exc}); check the file.") from None

    def _open(self, path: Path, offset: int):
        if path.suffix.lower() == ".gz":
            fh = gzip.open(path, "rb")
        else:
            fh = open(path, "rb", buffering=READ_BUFFER)  # noqa: SIM115 - closed by the caller's with
        if offset:
            fh.seek(offset)
        return fh

    def _seen(self, path: Path) -> None:
        try:
            self.stats.bytes_seen += path.stat().st_size
        except OSError:
            pass

    def _whole_file(self, path: Path) -> Iterator[tuple[int, int, str]]:
        """One document per file (.txt per file, python-code), as `split_txt(text, 'file')`."""
        if self.src.type == "python-code":
            try:
                data = path.read_bytes()
            except OSError:
                return
        else:
            if path.suffix.lower() != ".gz" and path.stat().st_size > MAX_RECORD_BYTES:
                check_record_size(path.stat().st_size, f"document 1 of '{path}'", self.where)
            data = read_bytes(path, self.where)
        self.records_parsed += 1
        self.stats.bytes_seen += len(data)
        text = decode(data)
        if text is None:
            self._undecodable(str(path))
            return
        if len(text) > MAX_RECORD_BYTES // 4:
            check_record_size(len(text.encode("utf-8", "surrogatepass")), f"document 1 of '{path}'", self.where)
        if text.strip():
            self.stats.bytes_kept += len(data)
            yield 0, 0, text

    def _text_lines(self, path: Path, anchor: int) -> Iterator[tuple[int, int, str]]:
        """Documents of a text file per line or per paragraph, as `split_txt`: lines end at \\n, \\r\\n or
        \\r; paragraphs are runs of lines that are not blank, joined with \\n. A physical line (ending
        at \\n) starts an anchor when no paragraph is pending there."""
        per_line = self.src.txt_unit == "line"
        if anchor == 0:
            self._seen(path)
        para: list[str] = []
        para_chars = 0
        a, done = anchor, 0  # the current anchor and the raw units since it
        offset = anchor
        with self._open(path, anchor) as fh:
            for raw in fh:
                start = offset
                offset += len(raw)
                self.records_parsed += 1
                check_record_size(len(raw), f"the line at byte {start} of '{path}'", self.where)
                body = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
                text = decode(body) if start == 0 else _decode_plain(body)
                if text is None:
                    self._undecodable(f"{path.name}@{start}")
                    parts = [""]  # an undecodable line reads as a blank one
                else:
                    parts = text.split("\r")
                if per_line:
                    for j, part in enumerate(parts):
                        if part.strip():
                            self.stats.bytes_kept += len(part)
                            yield start, j, part
                    continue
                if not para:
                    a, done = start, 0
                for part in parts:
                    if part.strip():
                        para.append(part)
                        para_chars += len(part)
                        if para_chars > MAX_RECORD_BYTES // 4:  # characters; a cheap pre-check before encoding
                            size = sum(len(p.encode("utf-8", "surrogatepass")) + 1 for p in para)
                            check_record_size(size, f"the paragraph at byte {a} of '{path}'", self.where)
                    elif para:
                        doc = "\n".join(para)
                        para, para_chars = [], 0
                        self.stats.bytes_kept += len(doc)
                        yield a, done, doc
                        done += 1
        if para:
            doc = "\n".join(para)
            self.stats.bytes_kept += len(doc)
            yield a, done, doc

    def _jsonl(self, path: Path, anchor: int) -> Iterator[tuple[int, int, str]]:
        where, field, match = self.where, self.src.text_field, self.src.match
        if anchor == 0:
            self._seen(path)
        lineno = 1 if anchor == 0 else 0  # line numbers are known when reading from the start
        offset = anchor
        with self._open(path, anchor) as fh:
            for raw in fh:
                start = offset
                offset += len(raw)
                location = f"line {lineno} of '{path}'" if lineno else f"the line at byte {start} of '{path}'"
                if lineno:
                    lineno += 1
                self.records_parsed += 1
                if not raw.strip():
                    continue
                check_record_size(len(raw), location, where)
                line = decode(raw)
                if line is None:
                    self._undecodable(f"{path.name}:{lineno - 1 if lineno else f'@{start}'}")
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(
                        f"{where}: {location} is not valid JSON ({exc.msg}); fix or remove that line.") from None
                text = _record_text(record, field, location, where, match)
                if text:
                    self.stats.bytes_kept += len(raw)
                    yield start, 0, text

    def _csv(self, path: Path, suffix: str, skip: int) -> Iterator[tuple[int, int, str]]:
        where, field, match = self.where, self.src.text_field, self.src.match
        if csv.field_size_limit() < CSV_FIELD_LIMIT:
            csv.field_size_limit(CSV_FIELD_LIMIT)
        self._seen(path)
        opener = gzip.open if path.suffix.lower() == ".gz" else open
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            try:
                header = next(reader, None)
                if not header:
                    return
                if field not in header:
                    raise InputError(f"{where}: '{path}' has no column '{field}' (columns: "
                                     f"{', '.join(header[:12])}); set text_field to one of them.")
                row_index = -1
                for row in reader:
                    if not row:
                        continue
                    row_index += 1
                    self.records_parsed += 1
                    if row_index < skip:
                        continue
                    if len(row) != len(header):
                        raise InputError(
                            f"{where}: row at line {reader.line_num} of '{path}' has {len(row)} fields where the "
                            f"header has {len(header)}; fix the quoting or the separators there.")
                    location = f"line {reader.line_num} of '{path}'"
                    text = _record_text(dict(zip(header, row)), field, location, where, match)
                    if text:
                        yield 0, row_index, text
            except csv.Error as exc:
                raise InputError(f"{where}: cannot parse line {reader.line_num} of '{path}' ({exc}); fix the "
                                 "quoting or the separators there.") from None
            except UnicodeDecodeError:
                self._undecodable(path.name)  # the rows before the bad bytes were read; the rest is skipped

    def _json(self, path: Path, skip: int) -> Iterator[tuple[int, int, str]]:
        where = self.where
        data = read_bytes(path, where)
        self.stats.bytes_seen += len(data)
        text = decode(data)
        if text is None:
            self._undecodable(path.name)
            return
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{where}: '{path}' is not valid JSON ({exc.msg} at line {exc.lineno}); fix the file.") from None
        del text, data
        records = obj.get("data") if isinstance(obj, dict) and isinstance(obj.get("data"), list) else obj
        if not isinstance(records, list):
            raise InputError(f"{where}: '{path}' must hold a list of records (or {{\"data\": [...]}}); convert it "
                             "to JSON Lines with one object per line.")
        for i in range(skip, len(records)):
            self.records_parsed += 1
            doc = _record_text(records[i], self.src.text_field, f"record {i} of '{path}'", where, self.src.match)
            if doc:
                yield 0, i, doc

    def _parquet(self, path: Path, skip: int) -> Iterator[tuple[int, int, str]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        where, field = self.where, self.src.text_field
        try:
            if path.suffix.lower() == ".gz":  # read whole (Parquet needs seeks); plain files are streamed
                data = read_bytes(path, where)
                self.stats.bytes_seen += len(data)
                parquet = pq.ParquetFile(pa.BufferReader(data))
            else:
                self._seen(path)
                parquet = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{where}: '{path}' is not a readable Parquet file ({exc}); check the file.") from None
        names = parquet.schema_arrow.names
        top = field if field in names else field.split(".")[0]
        if top not in names:
            raise InputError(f"{where}: '{path}' has no column '{top}' (columns: {', '.join(names[:12])}); "
                             "set text_field.")
        wanted = list(dict.fromkeys(c for c in [top, *(k.split(".")[0] for k in (self.src.match or {}))]
                                    if c in names))
        sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
        group, row = 0, 0
        while group < len(sizes) and row + sizes[group] <= skip:  # whole row groups before `skip` unread
            row += sizes[group]
            group += 1
        try:
            for batch in parquet.iter_batches(columns=wanted, batch_size=4096,
                                              row_groups=list(range(group, len(sizes)))):
                for record in batch.to_pylist():
                    self.records_parsed += 1
                    if row >= skip:
                        text = _record_text(record, field, f"row {row} of '{path}'", where, self.src.match)
                        if text:
                            yield 0, row, text
                    row += 1
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{where}: cannot read '{path}' at row {row} ({exc}); check the file.") from None

    # ----------------------------------------------------------------------------------------------
    # The Hub (or any datasets.IterableDataset given by dataset_factory)

    def _hub_dataset(self):
        if self._dataset is None:
            ds = self._dataset_factory() if self._dataset_factory is not None else load_hub_stream(self.src,
                                                                                                   self.where)
            if not hasattr(ds, "state_dict") and hasattr(ds, "to_iterable_dataset"):
                ds = ds.to_iterable_dataset()  # a map-style Dataset
            self._dataset = ds
        return self._dataset

    def _hub_raw(self, start: dict | None) -> Iterator[tuple[tuple, str]]:
        ds = self._hub_dataset()
        stateful = hasattr(ds, "state_dict") and hasattr(ds, "load_state_dict")
        record, state_at, state = 0, 0, None
        if start:
            record, state_at, state = int(start["record"]), int(start["state_at"]), start.get("state")
        if state is None:
            state_at = 0
        if stateful:
            ds.load_state_dict(deepcopy(state))  # None: from the beginning
        # ds.state_dict() follows the dataset's latest iteration: once another one has started on the same
        # object, this one takes no more snapshots (its positions then replay from the last good one)
        self._hub_iterations += 1
        mine = self._hub_iterations
        snapshot = (state_at, state)
        name = self.src.paths[0] if self.src.paths else "dataset"
        r = state_at - 1
        for example in ds:
            r += 1
            self.records_parsed += 1
            if r >= record:
                text = _record_text(example, self.src.text_field, f"row {r} of '{name}'", self.where,
                                    self.src.match)
                if text:
                    yield (0, snapshot, r), text
            if stateful and (r + 1) % SNAPSHOT_EVERY == 0 and self._hub_iterations == mine:
                snapshot = (r + 1, ds.state_dict())  # resumes at record r + 1


def _decode_plain(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_hub_stream(src: SourceConfig, where: str):
    """The Hub dataset as a `datasets.IterableDataset` (streaming), or one sentence saying why not."""
    import datasets

    from lmtune.hub import hub_reachable, offline_message

    dataset_id = src.paths[0]
    online = hub_reachable()  # offline, this also switches datasets to its local cache only
    try:
        return datasets.load_dataset(dataset_id, src.config_name, split=src.split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad id/split/config
        if not online:
            raise InputError(offline_message("dataset", dataset_id, f"{where}.path")) from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"{where}: cannot load Hub dataset '{dataset_id}' split '{src.split}' ({first}).") from None


class TextStream:
    """A `DocumentStream` over a callable that returns an iterable of texts (each call reads from the
    start). Positions are document numbers, so resuming replays the texts before it (untokenized)."""

    hub = False
    shuffle_files = False
    seed = 0

    def __init__(self, make_texts: Callable[[], Iterable[str]], where: str = "data.train"):
        self.make_texts = make_texts
        self.where = where
        self.stats = SourceStats()
        self.records_parsed = 0

    def documents(self, epoch: int, start: dict | None = None) -> Iterator[tuple[Position, str]]:
        skip = int(start["sub"]) if start else 0
        if start is None:
            self.stats = SourceStats()
        for i, text in enumerate(self.make_texts()):
            self.records_parsed += 1
            if i >= skip:
                self.stats.documents += 1
                yield (epoch, 0, 0, i, i), text

    def position(self, pos: Position) -> dict:
        return {"epoch": int(pos[0]), "sub": int(pos[3]), "kept": int(pos[4])}

    def signature(self, mtimes: bool = False) -> str:
        return "texts"

    def describe(self) -> str:
        return f"{self.where}: a stream of texts"

    def warn_undecodable(self) -> None:
        pass


def first_bytes(docs: Iterable[str], budget: int, counts: dict | None = None) -> Iterator[str]:
    """The documents up to `budget` UTF-8 bytes in all, the last one cut to fit; `counts` receives
    {"documents", "bytes"}. Stops pulling from `docs` once the budget is spent."""
    counts = counts if counts is not None else {}
    counts.update(documents=0, bytes=0)
    left = budget
    for text in docs:
        if left <= 0:
            return
        data = text.encode("utf-8", "surrogatepass")
        if len(data) > left:
            data = data[:left]
            text = data.decode("utf-8", "ignore")
        left -= len(data)
        counts["documents"] += 1
        counts["bytes"] += len(data)
        yield text
        if left <= 0:
            return

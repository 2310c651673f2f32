"""Raw documents from files, folders, globs, the Hub, or the running Python's own source code.

Every source yields plain strings (one per document). Problems in the user's data become one
`InputError` sentence naming the file (and line), the field, and the fix.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.config import SourceConfig
from lmtune.errors import InputError

log = logging.getLogger("lmtune")

TEXT_SUFFIXES = {".txt", ".text", ".md", ".py", ".rst"}
TABLE_SUFFIXES = {".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet"}
SUPPORTED = TEXT_SUFFIXES | TABLE_SUFFIXES
# The csv module refuses fields over 128 kB by default; a long document in one cell is normal here.
CSV_FIELD_LIMIT = 2**31 - 1
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass
class SourceStats:
    """What a source read, kept and skipped; printed so the user sees what the model trains on."""

    files_seen: int = 0
    files_kept: int = 0
    bytes_seen: int = 0
    bytes_kept: int = 0
    documents: int = 0
    undecodable: list[str] = field(default_factory=list)
    filtered_out: int = 0

    def summary(self, label: str, unit: str = "documents") -> str:
        parts = [f"{label}: {self.documents:,} {unit}"]
        if self.files_seen and unit != "documents":  # records: what was kept is counted in records
            parts.append(f"from {self.files_kept:,} of {self.files_seen:,} files ({self.bytes_seen / 1e6:.1f} MB)")
        elif self.files_seen:
            parts.append(
                f"from {self.files_kept:,} of {self.files_seen:,} files "
                f"({self.bytes_kept / 1e6:.1f} MB of {self.bytes_seen / 1e6:.1f} MB)"
            )
        if self.filtered_out:
            parts.append(f"{self.filtered_out:,} removed by the keyword filter")
        if self.undecodable:
            parts.append(f"{len(self.undecodable):,} skipped as not UTF-8 (first: {self.undecodable[0]})")
        return ", ".join(parts)


@dataclass
class Corpus:
    texts: list[str]
    stats: SourceStats
    fingerprint: str  # content hash: equal corpora share caches


# --------------------------------------------------------------------------------------------------
# Small pure helpers


def suffix_of(path: Path) -> str:
    """'.jsonl' for 'a.jsonl.gz' as well as 'a.jsonl'."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def get_field(record: Any, dotted: str) -> Any:
    """Follow 'answers.text' through dicts; across a list, collect the field from each element.
    A key that is literally 'answers.text' (a table flattened by `datasets`' flatten()) wins."""
    if isinstance(record, dict) and dotted in record:
        return record[dotted]
    value = record
    for key in dotted.split("."):
        if isinstance(value, dict):
            if key not in value:
                raise KeyError(key)
            value = value[key]
        elif isinstance(value, list):
            value = [v[key] for v in value if isinstance(v, dict) and key in v]
        else:
            raise KeyError(key)
    return value


def text_of(value: Any) -> str | None:
    """Strings as they are; (nested) lists of strings flattened and joined with spaces, as the ELI5
    tutorial does with `answers.text`. Anything else is a type error."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        parts = [text_of(v) for v in value]
        return " ".join(p for p in parts if p)
    raise TypeError(type(value).__name__)


def split_txt(text: str, unit: str) -> list[str]:
    """Documents of a text file. Lines end at \\n, \\r\\n or \\r only (as in Python's text mode; not
    at the form feeds, NELs or U+2028 that `str.splitlines` also breaks at); paragraphs are separated by
    lines that are empty or hold only whitespace."""
    if unit == "file":
        return [text] if text.strip() else []
    lines = _LINE_BREAK.split(text)
    if unit == "line":
        return [line for line in lines if line.strip()]
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines + [""]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    return paragraphs


def keep_by_keywords(text: str, keywords: list[str], mode: str) -> bool:
    if not keywords:
        return True
    hit = any(k in text for k in keywords)
    return hit if mode == "any" else not hit


def fingerprint_texts(texts: Iterable[str], salt: str = "") -> str:
    digest = hashlib.sha256(salt.encode())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:24]


def split_train_validation(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded document-level split: the same seed always holds out the same documents."""
    n = len(texts)
    if n < 2:
        raise InputError(
            f"only {n} document(s): cannot hold out a validation split; add documents or set data.validation."
        )
    n_val = min(n - 1, max(1, round(n * fraction)))
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [t for i, t in enumerate(texts) if i not in val_idx]
    val = [texts[i] for i in sorted(val_idx)]
    return train, val


# --------------------------------------------------------------------------------------------------
# Files


def user_path(pattern: str, where: str) -> Path:
    """`pattern` with `~` and `~user` expanded; an unknown user is named (os.path leaves it unexpanded)."""
    expanded = os.path.expanduser(pattern)
    if pattern.startswith("~") and expanded == pattern:
        user = pattern[1:].split("/", 1)[0]
        raise InputError(f"{where}: '{pattern}' starts with ~{user}, and there is no user '{user}' on this machine; "
                         "give the path in full.")
    return Path(expanded)


def path_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a file, in a few words, or None when it can: missing, a folder, a
    device or pipe (which never ends or blocks), a symlink that is broken or loops."""
    try:
        if path.is_symlink() and not path.exists():
            return "is a symlink that is broken or loops"
        if not path.exists():
            return "does not exist"
        if path.is_dir():
            return "is a folder, not a file"
        if not path.is_file():
            return "is not a regular file (a device, pipe or socket)"
    except OSError as exc:  # a loop deeper in the path, a name too long, no permission to look
        return f"cannot be looked at ({exc.strerror or exc})"
    return None


def expand_paths(patterns: list[str], where: str) -> list[Path]:
    """Files named directly, found recursively under folders, or matched by globs; sorted, unique."""
    found: list[Path] = []
    for pattern in patterns:
        path = user_path(pattern, where)
        # An existing file or folder is taken literally, even when its name holds '[' or '?'.
        if not path.exists() and any(ch in pattern for ch in "*?["):
            matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
            files = [m for m in matches if m.is_file()]
            if not files:
                raise InputError(f"{where}: the glob '{pattern}' matches no file; check the pattern.")
            found.extend(sorted(files))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and suffix_of(p) in SUPPORTED)
            if not files:
                raise InputError(
                    f"{where}: the folder '{pattern}' holds no supported file "
                    f"({', '.join(sorted(SUPPORTED))}); check the path."
                )
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"{where}: '{pattern}' {path_problem(path) or 'cannot be read'}; give an existing file, "
                             "folder or glob.")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    for p in unique:
        if suffix_of(p) not in SUPPORTED:
            raise InputError(
                f"{where}: '{p}' has an unsupported type '{suffix_of(p) or '(none)'}'; "
                f"use one of {', '.join(sorted(SUPPORTED))}."
            )
    return unique


def read_bytes(path: Path, where: str) -> bytes:
    try:
        data = path.read_bytes()
        if path.suffix.lower() == ".gz":
            data = gzip.decompress(data)
        return data
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{where}: cannot read '{path}' ({exc}); check the file.") from None


def decode(data: bytes) -> str | None:
    """UTF-8 text, without the byte-order mark that Windows tools (Excel's CSV) put first."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def required_field(record: dict, name: str, location: str, where: str, fix: str) -> Any:
    """A record's (dotted) field, or one sentence naming the record, the field, what it has and the fix."""
    try:
        return get_field(record, name)
    except KeyError:
        fields = ", ".join(list(record)[:12]) or "(none)"
        raise InputError(f"{where}: {location} has no field '{name}' (fields: {fields}); {fix}.") from None


def record_matches(record: dict, match: dict | None, location: str, where: str) -> bool:
    """Equality filter on record fields (e.g. {"split": "train"}); a field that is absent is an error."""
    for key, wanted in (match or {}).items():
        try:
            value = get_field(record, key)
        except KeyError:
            raise InputError(f"{where}: {location} has no field '{key}' named in match; fix match.") from None
        if value != wanted and str(value) != str(wanted):
            return False
    return True


def _record_text(record: Any, text_field: str, location: str, where: str, match: dict | None = None) -> str | None:
    if not isinstance(record, dict):
        raise InputError(
            f"{where}: {location} is a {type(record).__name__}, not an object with a '{text_field}' field; "
            "each record must be a JSON object."
        )
    if match and not record_matches(record, match, location, where):
        return None
    try:
        value = get_field(record, text_field)
    except KeyError:
        fields = ", ".join(list(record)[:12]) or "(none)"
        raise InputError(
            f"{where}: {location} has no field '{text_field}' (fields: {fields}); set text_field to one of them."
        ) from None
    try:
        return valid_unicode(text_of(value), f"field '{text_field}' of {location}", where)
    except TypeError as exc:
        raise InputError(
            f"{where}: field '{text_field}' in {location} is a {exc}, not text; choose a text field."
        ) from None


def valid_unicode(text: str | None, what: str, where: str) -> str | None:
    """`text` unless it holds a lone surrogate (JSON's "\\ud800" escapes decode to one), which is no
    character: tokenizers and UTF-8 writers fail on it far from the record."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{where}: {what} is not valid Unicode (a lone surrogate {text[exc.start]!r} at character "
                         f"{exc.start}, from a JSON escape); fix or remove that record.") from None
    return text


# One document or record above this size is almost surely a broken file (a dump without newlines); it
# would also need gigabytes to tokenize at once. Refused with a sentence rather than read.
MAX_RECORD_BYTES = 32 * 2**20


def check_record_size(size: int, location: str, where: str) -> None:
    if size > MAX_RECORD_BYTES:
        raise InputError(f"{where}: {location} is {size / 2**20:.1f} MB long, over the {MAX_RECORD_BYTES // 2**20} MB "
                         "one record or document may take; split it (one document per line or per file).")


def iter_table_records(path: Path, suffix: str, where: str, stats: SourceStats,
                       column: str | None = None, columns: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    """(location, record) for every record of a JSON Lines / JSON / CSV / Parquet file. `column`, when
    given, must exist in a CSV header or Parquet schema (checked before the first row); `columns`
    limits what Parquet reads."""
    if suffix == ".parquet":
        yield from _iter_parquet(path, where, stats, column, columns)
        return
    data = read_bytes(path, where)
    stats.bytes_seen += len(data)
    if suffix in {".jsonl", ".ndjson"}:
        for lineno, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            check_record_size(len(raw), f"line {lineno} of '{path}'", where)
            line = decode(raw)
            if line is None:
                stats.undecodable.append(f"{path.name}:{lineno}")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{where}: line {lineno} of '{path}' is not valid JSON ({exc.msg}); fix or remove that line."
                ) from None
            except RecursionError:
                raise InputError(f"{where}: line {lineno} of '{path}' is nested too deeply to read; a record is an "
                                 "object of fields -- fix or remove that line.") from None
            yield f"line {lineno} of '{path}'", record
        return
    text = decode(data)
    if text is None:
        stats.undecodable.append(path.name)
        return
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{where}: '{path}' is not valid JSON ({exc.msg} at line {exc.lineno}); fix the file."
            ) from None
        except RecursionError:
            raise InputError(f"{where}: '{path}' is nested too deeply to read; give a list of record objects (or "
                             "JSON Lines).") from None
        records = obj.get("data") if isinstance(obj, dict) and isinstance(obj.get("data"), list) else obj
        if not isinstance(records, list):
            raise InputError(
                f"{where}: '{path}' must hold a list of records (or {{\"data\": [...]}}); "
                "convert it to JSON Lines with one object per line."
            )
        for i, record in enumerate(records):
            yield f"record {i} of '{path}'", record
        return
    yield from _iter_csv(path, text, suffix, where, column)


def iter_table_file(path: Path, suffix: str, text_field: str, where: str, stats: SourceStats,
                    match: dict | None = None) -> Iterator[str]:
    columns = [text_field.split(".")[0], *(k.split(".")[0] for k in (match or {}))]
    for location, record in iter_table_records(path, suffix, where, stats, column=text_field, columns=columns):
        text = _record_text(record, text_field, location, where, match)
        if text:
            stats.bytes_kept += len(text.encode("utf-8"))
            yield text


def _iter_csv(path: Path, text: str, suffix: str, where: str, column: str | None) -> Iterator[tuple[str, dict]]:
    """CSV / TSV through the standard csv module: it reports ragged rows, which we refuse."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
    try:
        header = next(reader, None)
        if not header:
            return
        if column is not None and column not in header:
            raise InputError(
                f"{where}: '{path}' has no column '{column}' (columns: {', '.join(header[:12])}); "
                "set text_field to one of them."
            )
        spans: list[int] = []  # lines each row took, to notice a quote that swallows the rows after it
        start = reader.line_num
        for row in reader:
            span, start = reader.line_num - start, reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise InputError(
                    f"{where}: row at line {reader.line_num} of '{path}' has {len(row)} fields where the header "
                    f"has {len(header)}; fix the quoting or the separators there."
                )
            if swallowed(span, spans):
                raise InputError(
                    f"{where}: the row ending at line {reader.line_num} of '{path}' runs over {span} lines where rows "
                    f"take {sorted(spans)[len(spans) // 2]}: a quote opened at line {reader.line_num - span + 1} "
                    "swallows the rows after it; fix the quoting there.")
            spans.append(span)
            yield f"line {reader.line_num} of '{path}'", dict(zip(header, row))
    except csv.Error as exc:
        raise InputError(
            f"{where}: cannot parse line {reader.line_num} of '{path}' ({exc}); fix the quoting or the separators "
            "there."
        ) from None


def swallowed(span: int, spans: list[int]) -> bool:
    """A CSV row spanning far more lines than the rows before it (at least 20 of them): at least 50 lines
    and 20 times their median. Cells with a few line breaks are normal; a quote left open is not."""
    if len(spans) < 20 or span < 50:
        return False
    return span > 20 * sorted(spans)[len(spans) // 2]


def _iter_parquet(path: Path, where: str, stats: SourceStats, column: str | None,
                  columns: list[str] | None) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".gz":  # read whole (Parquet needs seeks); plain files are streamed
            data = read_bytes(path, where)
            stats.bytes_seen += len(data)
            parquet = pq.ParquetFile(pa.BufferReader(data))
        else:
            stats.bytes_seen += path.stat().st_size
            parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{where}: '{path}' is not a readable Parquet file ({exc}); check the file.") from None
    names = parquet.schema_arrow.names
    if column is not None:
        # A column literally named 'answers.text' (a flattened table) wins over the nested field.
        top = column if column in names else column.split(".")[0]
        if top not in names:
            raise InputError(
                f"{where}: '{path}' has no column '{top}' (columns: {', '.join(names[:12])}); set text_field."
            )
        columns = [top, *(columns or [])]
    wanted = list(dict.fromkeys(c for c in columns if c in names)) if columns else None
    row = 0
    try:
        for batch in parquet.iter_batches(columns=wanted, batch_size=4096):
            for record in batch.to_pylist():
                yield f"row {row} of '{path}'", record
                row += 1
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{where}: cannot read '{path}' at row {row} ({exc}); check the file.") from None


def iter_file_documents(src: SourceConfig, where: str, stats: SourceStats) -> Iterator[str]:
    for path in expand_paths(src.paths, where):
        stats.files_seen += 1
        suffix = suffix_of(path)
        if suffix in TEXT_SUFFIXES:
            data = read_bytes(path, where)
            stats.bytes_seen += len(data)
            text = decode(data)
            if text is None:
                stats.undecodable.append(str(path))
                continue
            docs = split_txt(text, src.txt_unit)
            for i, doc in enumerate(docs):
                if len(doc) > MAX_RECORD_BYTES // 4:  # characters; a cheap pre-check before encoding
                    check_record_size(len(doc.encode()), f"document {i + 1} of '{path}'", where)
            if docs:
                stats.files_kept += 1
                stats.bytes_kept += len(data)
            yield from docs
        else:
            first = True
            for text in iter_table_file(path, suffix, src.text_field, where, stats, src.match):
                if first:  # counted on the first document: a reader may stop early (max_documents)
                    stats.files_kept += 1
                    first = False
                yield text


# --------------------------------------------------------------------------------------------------
# The running Python's own source code (the offline stand-in for the course's codeparrot data)


def python_code_roots(roots: list[str]) -> list[Path]:
    paths = sysconfig.get_paths()
    found: list[Path] = []
    if "stdlib" in roots:
        found.append(Path(paths["stdlib"]))
    if "site-packages" in roots:
        found.extend(Path(p) for p in {paths["purelib"], paths["platlib"], *_site_dirs()})
    return [p.resolve() for p in dict.fromkeys(found) if p.is_dir()]


def _site_dirs() -> list[str]:
    return [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]


def python_files(roots: list[Path]) -> list[Path]:
    """Sorted .py files under the roots. A site-packages folder met while walking (the base
    interpreter's, under the stdlib) is skipped: installed packages are the other root's business."""
    files: set[Path] = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in {"__pycache__", "site-packages", "dist-packages"}]
            files.update(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files)


def iter_python_code(src: SourceConfig, stats: SourceStats) -> Iterator[str]:
    roots = python_code_roots(src.roots)
    for path in python_files(roots):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        stats.files_seen += 1
        stats.bytes_seen += len(data)
        text = decode(data)
        if text is None:
            stats.undecodable.append(str(path))
            continue
        if not text.strip():
            continue
        if not keep_by_keywords(text, src.keywords, src.keyword_mode):
            stats.filtered_out += 1
            continue
        stats.files_kept += 1
        stats.bytes_kept += len(data)
        yield text


# --------------------------------------------------------------------------------------------------
# The Hub


def iter_hub_records(src: SourceConfig, where: str) -> Iterator[tuple[str, dict]]:
    from lmtune.hub import hub_reachable, offline_message

    dataset_id = src.paths[0]
    import datasets

    online = hub_reachable()  # offline, this also switches datasets to its local cache only
    try:
        ds = datasets.load_dataset(dataset_id, src.config_name, split=src.split, streaming=src.streaming)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad id/split/config
        if not online:
            raise InputError(offline_message("dataset", dataset_id, f"{where}.path")) from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"{where}: cannot load Hub dataset '{dataset_id}' split '{src.split}' ({first}).") from None
    for i, record in enumerate(ds):
        yield f"row {i} of '{dataset_id}'", record


def iter_hub_documents(src: SourceConfig, where: str) -> Iterator[str]:
    for location, record in iter_hub_records(src, where):
        text = _record_text(record, src.text_field, location, where, src.match)
        if text:
            yield text


# --------------------------------------------------------------------------------------------------
# Entry points


def is_hub_id(src: SourceConfig) -> bool:
    if src.type == "hub":
        return True
    if src.type != "auto" or len(src.paths) != 1:
        return False
    p = src.paths[0]
    return not Path(os.path.expanduser(p)).exists() and not any(ch in p for ch in "*?[") and not p.startswith(
        (".", "/", "~")
    ) and suffix_of(Path(p)) not in SUPPORTED and p.count("/") <= 1


def iter_documents(src: SourceConfig, where: str, stats: SourceStats) -> Iterator[str]:
    """Documents after filters, lazily: the streaming path never holds the corpus in memory."""
    if src.type == "python-code":
        docs: Iterable[str] = iter_python_code(src, stats)
    elif is_hub_id(src):
        docs = iter_hub_documents(src, where)
    else:
        docs = iter_file_documents(src, where, stats)
    kept = 0
    for text in docs:
        if src.type != "python-code" and not keep_by_keywords(text, src.keywords, src.keyword_mode):
            stats.filtered_out += 1
            continue
        kept += 1
        stats.documents = kept
        yield text
        if src.max_documents is not None and kept >= src.max_documents:
            return


def warn_undecodable(stats: SourceStats, where: str) -> None:
    if stats.undecodable:
        log.warning("%s: skipped %d undecodable (non UTF-8) item(s), first %s", where, len(stats.undecodable),
                    stats.undecodable[0])


def load_corpus(src: SourceConfig, where: str) -> Corpus:
    from lmtune.progress import progress

    stats = SourceStats()
    texts = list(progress(iter_documents(src, where, stats), f"{where}: reading", unit="docs"))
    warn_undecodable(stats, where)
    if not texts:
        why = " after the keyword filter" if stats.filtered_out else ""
        raise InputError(
            f"{where}: the corpus is empty{why} ({stats.summary('read')}); "
            "check the path, the text field and the keywords."
        )
    return Corpus(texts=texts, stats=stats, fingerprint=fingerprint_texts(texts))


# --------------------------------------------------------------------------------------------------
# Records (tasks whose examples have several fields: QA, classification, preferences)


@dataclass
class Records:
    rows: list[tuple[str, dict]]  # (location for error messages, record)
    stats: SourceStats
    fingerprint: str


def iter_records(src: SourceConfig, where: str, stats: SourceStats) -> Iterator[tuple[str, dict]]:
    """Records of table files or a Hub dataset after `match`, up to `max_documents`."""
    if src.type == "python-code":
        raise InputError(f"{where}: the python-code source holds plain text, not records; give a table file.")
    if is_hub_id(src):
        rows: Iterable[tuple[str, Any]] = iter_hub_records(src, where)
    else:
        rows = _iter_file_records(src, where, stats)
    kept = 0
    for location, record in rows:
        if not isinstance(record, dict):
            raise InputError(f"{where}: {location} is a {type(record).__name__}, not an object; each record must "
                             "be a JSON object.")
        if src.match and not record_matches(record, src.match, location, where):
            continue
        kept += 1
        stats.documents = kept
        yield location, record
        if src.max_documents is not None and kept >= src.max_documents:
            return


def _iter_file_records(src: SourceConfig, where: str, stats: SourceStats) -> Iterator[tuple[str, Any]]:
    for path in expand_paths(src.paths, where):
        stats.files_seen += 1
        suffix = suffix_of(path)
        if suffix not in TABLE_SUFFIXES:
            raise InputError(f"{where}: '{path}' is plain text, but this task reads records with named fields; "
                             f"give a {', '.join(sorted(TABLE_SUFFIXES))} file.")
        first = True
        for location, record in iter_table_records(path, suffix, where, stats):
            if first:
                stats.files_kept += 1
                first = False
            yield location, record


def load_records(src: SourceConfig, where: str) -> Records:
    stats = SourceStats()
    rows = list(iter_records(src, where, stats))
    warn_undecodable(stats, where)
    if not rows:
        raise InputError(f"{where}: no records found ({stats.summary('read', 'records')}); check the path and match.")
    digest = hashlib.sha256()
    for _, record in rows:
        digest.update(json.dumps(record, sort_keys=True, default=str).encode("utf-8", "surrogatepass"))
    return Records(rows, stats, digest.hexdigest()[:32])

"""Random-access document sources for local files: .txt, .jsonl and ArrayRecord.

A source's items are documents: small handles whose `read()` gives the text in pieces of at most `PIECE_CHARS`
characters (so a document of any length is never held in memory whole), or, for a fine-tuning record, the checked
record (`FineTuningRecord`; `ring_jax.data.sft` says which of its tokens are learned). `.txt`: one document per file.
`.jsonl`: one JSON object per non-blank line, text in `text_field` or a fine-tuning record (lines are indexed by byte
offset; lines longer than `WHOLE_LINE_BYTES` are parsed as a stream and must hold `text_field`). ArrayRecord: each
record is a UTF-8 JSON object as in `.jsonl` (a record starting with '{') or plain UTF-8 text; a record itself is
read whole, as ArrayRecord does. Invalid UTF-8 or JSON, empty files and unreadable files raise DataError naming the
file (and line or record).
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from ring_jax.data.errors import DataError
from ring_jax.data.json_stream import string_field_pieces

PIECE_CHARS = 1 << 16  # a document is decoded and tokenized in pieces of at most this many characters
WHOLE_LINE_BYTES = 1 << 20  # jsonl lines up to this size go through json.loads; longer ones are streamed
_READ_BYTES = 1 << 16
_INDEX_READ_BYTES = 1 << 20
_WHITESPACE_BYTES = np.zeros(256, bool)
_WHITESPACE_BYTES[list(b" \t\n\r\x0b\x0c")] = True

_SUFFIX_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".arrayrecord": "arrayrecord",
                   ".array_record": "arrayrecord"}


FineTuningRecord = dict[str, Any]  # a checked {"prompt", "completion"} or {"messages"} record


class Document(Protocol):
    """A document of a file source: `where` names it in errors; `read()` gives its text, a piece at a time, or the
    fine-tuning record it holds."""

    where: str

    def read(self) -> Iterator[str] | FineTuningRecord: ...


def resolve_paths(source: str, field: str = "data.source") -> list[str]:
    """Comma-separated paths or globs -> sorted existing files; raises DataError naming `field` and missing ones."""
    paths: list[str] = []
    for pattern in (p.strip() for p in source.split(",") if p.strip()):
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise DataError(f"{field}: no file matches {pattern!r} (cwd {os.getcwd()})")
        for match in matches:
            if os.path.isdir(match):
                raise DataError(f"{field}: {match!r} is a directory; pass files or a glob")
            paths.append(match)
    return paths


def infer_format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIX_FORMATS:
        raise DataError(f"data.format: cannot infer the format of {path!r}; set data.format to one of "
                        f"txt/jsonl/arrayrecord")
    return _SUFFIX_FORMATS[suffix]


def _file_chunks(path: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Bytes [start, end) of `path` in chunks of _READ_BYTES."""
    with open(path, "rb") as f:
        f.seek(start)
        remaining = float("inf") if end is None else end - start
        while remaining > 0 and (chunk := f.read(int(min(_READ_BYTES, remaining)))):
            remaining -= len(chunk)
            yield chunk


def _memory_chunks(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), _READ_BYTES):
        yield bytes(view[start:start + _READ_BYTES])


def _utf8_pieces(chunks: Iterator[bytes], where: Callable[[int], str]) -> Iterator[str]:
    """Strict UTF-8 decoding chunk by chunk; `where(line)` names the place of an invalid byte."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    line = 1
    for chunk in chunks:
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError as e:
            bad_line = line + chunk.count(b"\n", 0, max(e.start, 0))
            raise DataError(f"data.source: {where(bad_line)}: not valid UTF-8 ({e.reason})") from None
        line += chunk.count(b"\n")
        if text:
            yield text
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise DataError(f"data.source: {where(line)}: ends inside a UTF-8 character ({e.reason})") from None


def _record_content(record: object, text_field: str, where: str) -> Iterator[str] | FineTuningRecord:
    """What a JSON record holds: its `text_field` string (in pieces), else a prompt/completion or messages record.

    Raises DataError naming `where` for a record with none of these fields or with mistyped ones."""
    if isinstance(record, dict) and text_field in record:
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"data.text_field: {where} field {text_field!r} is {type(text).__name__}, not a string")
        return _slices(text)
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        for field in ("prompt", "completion"):
            if not isinstance(record[field], str):
                raise DataError(f"data.source: {where} field {field!r} is {type(record[field]).__name__}, not a string")
        return {"prompt": record["prompt"], "completion": record["completion"]}
    if isinstance(record, dict) and "messages" in record:
        return {"messages": _checked_messages(record["messages"], where)}
    raise DataError(f"data.text_field: {where} has no field {text_field!r} (nor 'prompt' + 'completion', nor "
                    f"'messages' for fine-tuning)")  # fmt: skip


def _checked_messages(messages: object, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"data.source: {where} field 'messages' must be a non-empty list of {{role, content}}")
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):  # fmt: skip
            raise DataError(f"data.source: {where} messages[{index}] needs string 'role' and 'content' fields")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"data.source: {where} has no assistant message to learn")
    return messages


def _slices(text: str) -> Iterator[str]:
    for start in range(0, len(text), PIECE_CHARS):
        yield text[start:start + PIECE_CHARS]


def _json_content(read_whole: Callable[[], bytes], chunks: Callable[[], Iterator[bytes]], size: int, field: str,
                  where: str) -> Iterator[str] | FineTuningRecord:
    """What a JSON object of `size` bytes holds: parsed whole (json.loads) when small; a larger one is streamed and
    must hold the text in `field`."""
    if size > WHOLE_LINE_BYTES:
        return string_field_pieces(chunks(), field, where)
    try:
        record = json.loads(read_whole())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(f"data.source: {where} is not valid JSON ({e})") from None
    return _record_content(record, field, where)


class TextFileDocument:
    def __init__(self, path: str):
        self.path = path
        self.where = path

    def read(self) -> Iterator[str]:
        return _utf8_pieces(_file_chunks(self.path), lambda line: f"{self.path} line {line}")


class TextFilesSource:
    """One document per .txt file; an empty file is an error (it would train on BOS/EOS alone)."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)
        for path in self._paths:
            if os.path.getsize(path) == 0:
                raise DataError(f"data.source: {path} is empty")

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> TextFileDocument:
        return TextFileDocument(self._paths[index])


class JsonlLineDocument:
    def __init__(self, path: str, start: int, end: int, line: int, field: str):
        self._path, self._start, self._end, self._field = path, start, end, field
        self.where = f"{path} line {line}"

    def _read_whole(self) -> bytes:
        with open(self._path, "rb") as f:
            f.seek(self._start)
            return f.read(self._end - self._start)

    def read(self) -> Iterator[str] | FineTuningRecord:
        return _json_content(self._read_whole, lambda: _file_chunks(self._path, self._start, self._end),
                            self._end - self._start, self._field, self.where)


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, 1-based line number) int64 arrays of the non-blank lines of `path`, read in large blocks."""
    starts, ends, numbers = [], [], []
    line_start, line_has_text, line_number, base = 0, False, 1, 0
    with open(path, "rb") as f:
        while block := f.read(_INDEX_READ_BYTES):
            data = np.frombuffer(block, np.uint8)
            newlines = np.flatnonzero(data == ord("\n"))
            text_before = np.concatenate([[0], np.cumsum(~_WHITESPACE_BYTES[data], dtype=np.int32)])
            segment_starts = np.concatenate([[0], newlines + 1])
            segment_ends = np.concatenate([newlines, [len(data)]])
            has_text = text_before[segment_ends] > text_before[segment_starts]
            if len(newlines):
                complete_has_text = has_text[:-1].copy()
                complete_has_text[0] |= line_has_text
                complete_starts = base + segment_starts[:-1]
                complete_starts[0] = line_start
                keep = np.flatnonzero(complete_has_text)
                starts.append(complete_starts[keep])
                ends.append(base + newlines[keep])
                numbers.append(line_number + keep)
                line_start, line_has_text = base + int(segment_starts[-1]), bool(has_text[-1])
                line_number += len(newlines)
            else:
                line_has_text |= bool(has_text[-1])
            base += len(block)
    if line_has_text:
        starts.append(np.array([line_start]))
        ends.append(np.array([base]))
        numbers.append(np.array([line_number]))
    as_int64 = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return as_int64(starts), as_int64(ends), as_int64(numbers)


class JsonlSource:
    """One document per non-blank line of a .jsonl file (random access by byte offset)."""

    def __init__(self, path: str, text_field: str):
        self._path = path
        self._text_field = text_field
        self._starts, self._ends, self._lines = _index_lines(path)
        if len(self._starts) == 0:
            raise DataError(f"data.source: {path} holds no documents (it is empty or blank)")

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> JsonlLineDocument:
        return JsonlLineDocument(self._path, int(self._starts[index]), int(self._ends[index]),
                                 int(self._lines[index]), self._text_field)


class RecordDocument:
    """One ArrayRecord record (bytes in memory): a JSON object when it starts with '{', else plain UTF-8 text."""

    def __init__(self, data: bytes, where: str, field: str):
        self._data, self._field = data, field
        self.where = where

    def read(self) -> Iterator[str] | FineTuningRecord:
        if self._data.lstrip()[:1] == b"{":
            return _json_content(lambda: self._data, lambda: _memory_chunks(self._data), len(self._data),
                                self._field, self.where)
        return _utf8_pieces(_memory_chunks(self._data), lambda line: f"{self.where} line {line}")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


class ArrayRecordSource:
    """The records of one ArrayRecord file."""

    def __init__(self, path: str, text_field: str):
        self._path = path
        self._text_field = text_field
        try:  # the reader is native code: any failure here means the file is not a readable ArrayRecord file
            self._source = grain.sources.ArrayRecordDataSource([path])
            self._length = len(self._source)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"data.source: {path} is not a readable ArrayRecord file ({_one_line(e)})") from None
        if self._length == 0:
            raise DataError(f"data.source: {path} holds no records")

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> RecordDocument:
        where = f"{self._path} record {index}"
        try:
            data = self._source[index]
        except Exception as e:  # noqa: BLE001
            raise DataError(f"data.source: {where} cannot be read ({_one_line(e)})") from None
        return RecordDocument(data, where, self._text_field)


class ConcatSource:
    """Concatenation of several random-access sources."""

    def __init__(self, sources: Sequence):
        self._sources = list(sources)
        self._starts = []
        total = 0
        for source in self._sources:
            self._starts.append(total)
            total += len(source)
        self._length = total

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Document:
        for source, start in zip(reversed(self._sources), reversed(self._starts), strict=True):
            if index >= start:
                return source[index - start]
        raise IndexError(index)


def make_file_source(source: str, data_format: str, text_field: str, field: str = "data.source"):
    """Builds one random-access source over all files named by `source` (comma-separated paths/globs, the value of
    config `field`)."""
    by_format: dict[str, list[str]] = {}
    for path in resolve_paths(source, field):
        by_format.setdefault(infer_format(path, data_format), []).append(path)
    sources = []
    for fmt, paths in by_format.items():
        if fmt == "txt":
            sources.append(TextFilesSource(paths))
        elif fmt == "jsonl":
            sources.extend(JsonlSource(path, text_field) for path in paths)
        else:
            sources.extend(ArrayRecordSource(path, text_field) for path in paths)
    return sources[0] if len(sources) == 1 else ConcatSource(sources)

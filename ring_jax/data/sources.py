"""Random-access document sources for local files: .txt, .jsonl and ArrayRecord.

Each source yields documents: `str`, or a fine-tuning record (`document_of`; `ring_jax.data.sft` says which of its
tokens are learned). `.txt`: one document per file. `.jsonl`: one JSON object per line, text in `text_field` or a
fine-tuning record (lines are indexed by byte offset, so files are not loaded into memory). ArrayRecord: each record
is a UTF-8 JSON object (as in .jsonl), or plain UTF-8 text.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from typing import Any

import grain

from ring_jax.errors import RingJaxError

_SUFFIX_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".arrayrecord": "arrayrecord",
                   ".array_record": "arrayrecord"}


class DataError(RingJaxError):
    """Bad or missing training data; the message names the config field or file."""


Document = str | dict[str, Any]  # plain text, or a checked {"prompt", "completion"} / {"messages"} record


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


class TextFilesSource:
    """One document per .txt file."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> str:
        with open(self._paths[index], encoding="utf-8", errors="replace") as f:
            return f.read()


def document_of(record: object, text_field: str, where: str) -> Document:
    """The document a JSON record holds: its `text_field` string, else a prompt/completion or messages record.

    Raises DataError naming `where` for a record with none of these fields or with mistyped ones."""
    if isinstance(record, dict) and text_field in record:
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"data.text_field: {where} field {text_field!r} is {type(text).__name__}, not a string")
        return text
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


class JsonlSource:
    """One document per non-empty line of a .jsonl file (random access by byte offset)."""

    def __init__(self, path: str, text_field: str):
        self._path = path
        self._text_field = text_field
        self._offsets: list[int] = []
        with open(path, "rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    self._offsets.append(offset)
                offset += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> Document:
        with open(self._path, "rb") as f:
            f.seek(self._offsets[index])
            line = f.readline()
        where = f"{self._path} line at byte {self._offsets[index]}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data.source: {where} is not valid JSON: {e}") from e
        return document_of(record, self._text_field, where)


class ArrayRecordSource:
    """ArrayRecord files whose records are UTF-8 JSON objects (text in `text_field`) or plain UTF-8 text."""

    def __init__(self, paths: Sequence[str], text_field: str):
        self._source = grain.sources.ArrayRecordDataSource(list(paths))
        self._text_field = text_field

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Document:
        data = self._source[index].decode("utf-8", errors="replace")
        if data.lstrip().startswith("{"):
            try:
                record = json.loads(data)
            except json.JSONDecodeError:
                return data
            return document_of(record, self._text_field, f"ArrayRecord record {index}")
        return data


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
            sources.append(ArrayRecordSource(paths, text_field))
    combined = sources[0] if len(sources) == 1 else ConcatSource(sources)
    if len(combined) == 0:
        raise DataError(f"{field}: {source!r} holds no documents")
    return combined

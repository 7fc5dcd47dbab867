"""One string field of a JSON object read in bounded memory, for documents too large to load at once.

`string_field_pieces(chunks, field, where)` scans the object from an iterator of byte chunks and yields the
field's decoded text in pieces of at most 64 K characters: memory stays bounded by the chunk and piece sizes
however long the document is (json.loads decodes each piece, in C). The object's own structure is checked
(braces, names, ':' and ','); values of the other fields are skipped by bracket depth without being decoded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from ring_jax.data.errors import DataError

_WHITESPACE = re.compile(rb"[ \t\n\r]*")
# A span of string content: up to 4096 tokens, each a run of <= 16 plain bytes or one escape (a surrogate pair is
# one token). The bounds keep a span shorter than _SPAN_BYTES, so a span that does not reach the end of a buffer
# holding _SPAN_BYTES more bytes ends at a complete token, never inside an escape or between a surrogate pair.
_STRING_SPAN = re.compile(
    rb'(?:[^"\\\x00-\x1f]{1,16}'
    rb"|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|\\u[0-9a-fA-F]{4}"
    rb'|\\["\\/bfnrt]){1,4096}'
)
_SPAN_BYTES = 4096 * 16 + 12
_LITERAL = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")
_NOT_STRUCTURE = re.compile(rb'[^"{}\[\]]+')
_MAX_NAME_BYTES = 4096
_VALUE_TYPES = {b"{": "dict", b"[": "list", b"t": "bool", b"f": "bool", b"n": "NoneType"}


def _utf8_safe_end(data: bytearray) -> int:
    """The largest cut <= len(data) that does not split a multi-byte UTF-8 character."""
    start = len(data) - 1
    while start > 0 and len(data) - start < 4 and data[start] & 0xC0 == 0x80:
        start -= 1
    lead = data[start] if data else 0
    length = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
    return start if start + length > len(data) else len(data)


class _Scanner:
    """A cursor over a byte stream that refills its buffer from `chunks` as the parse needs more."""

    def __init__(self, chunks: Iterator[bytes], where: str):
        self._chunks = chunks
        self._where = where
        self._buffer = b""
        self._pos = 0
        self._dropped = 0  # bytes of the stream before self._buffer
        self._eof = False

    def fail(self, message: str) -> None:
        raise DataError(f"data.source: {self._where} is not valid JSON: {message} (byte {self._dropped + self._pos})")

    def _fill(self, need: int) -> bool:
        """Makes at least `need` bytes available after the cursor unless the stream ends first."""
        available = len(self._buffer) - self._pos
        if available >= need or self._eof:
            return available >= need
        parts = [self._buffer[self._pos :]]
        while available < need:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._eof = True
                break
            parts.append(chunk)
            available += len(chunk)
        self._dropped += self._pos
        self._buffer, self._pos = b"".join(parts), 0
        return available >= need

    def peek(self) -> bytes:
        """The next byte after whitespace, b"" at the end of the stream."""
        while True:
            self._pos = _WHITESPACE.match(self._buffer, self._pos).end()
            if self._pos < len(self._buffer) or not self._fill(1):
                return self._buffer[self._pos : self._pos + 1]

    def take(self, expected: bytes, what: str) -> None:
        if self.peek() != expected:
            self.fail(f"expected {what}")
        self._pos += 1

    def _string_spans(self) -> Iterator[bytes]:
        """Raw content of the string whose opening quote was just taken, in spans that end at a token boundary and
        at a UTF-8 character boundary; the closing quote is taken."""
        while True:
            self._fill(_SPAN_BYTES + 1)
            match = _STRING_SPAN.match(self._buffer, self._pos)
            if match is None:
                if self._buffer[self._pos : self._pos + 1] == b'"':
                    self._pos += 1
                    return
                self.fail("unterminated string" if self._pos >= len(self._buffer) else "bad character in a string")
            span = self._buffer[self._pos : match.end()]
            cut = _utf8_safe_end(span) or len(span)  # 0 only for invalid UTF-8, which _decode reports
            self._pos += cut
            yield span[:cut]

    def _decode(self, raw: bytes) -> str:
        try:
            return json.loads(b'"' + raw + b'"')
        except ValueError as e:  # UnicodeDecodeError included
            raise DataError(f"data.source: {self._where}: undecodable text ({e})") from None

    def string_pieces(self) -> Iterator[str]:
        for span in self._string_spans():
            yield self._decode(span)

    def name(self) -> str | None:
        """A field name (its opening quote already taken); None if it is longer than any field name we look for."""
        raw = b""
        for span in self._string_spans():
            if len(raw) <= _MAX_NAME_BYTES:
                raw += span
        return self._decode(raw) if len(raw) <= _MAX_NAME_BYTES else None

    def skip_value(self) -> None:
        first = self.peek()
        if first == b'"':
            self._pos += 1
            for _ in self._string_spans():
                pass
        elif first in (b"{", b"["):
            self._skip_container()
        else:
            self._fill(1024)
            match = _LITERAL.match(self._buffer, self._pos)
            if match is None:
                self.fail("expected a value")
            self._pos = match.end()

    def _skip_container(self) -> None:
        depth = 0
        while True:
            if not self._fill(1):
                self.fail("unterminated object or array")
            char = self._buffer[self._pos : self._pos + 1]
            if char == b'"':
                self._pos += 1
                for _ in self._string_spans():
                    pass
                continue
            if char in (b"{", b"["):
                depth += 1
            elif char in (b"}", b"]"):
                depth -= 1
            else:
                self._pos = _NOT_STRUCTURE.match(self._buffer, self._pos).end()
                continue
            self._pos += 1
            if depth == 0:
                return


def string_field_pieces(chunks: Iterator[bytes], field: str, where: str) -> Iterator[str]:
    """Decoded text of the string `field` of the JSON object in `chunks`, in pieces of at most 64 K characters.

    Raises DataError naming `where` for invalid JSON, a missing field or a field that is not a string.
    """
    scanner = _Scanner(chunks, where)
    scanner.take(b"{", "a JSON object")
    found = False
    if scanner.peek() == b"}":
        scanner.take(b"}", "'}'")
    else:
        while True:
            scanner.take(b'"', "a field name")
            name = scanner.name()
            scanner.take(b":", "':'")
            if name == field and not found:
                first = scanner.peek()
                if first != b'"':
                    value_type = _VALUE_TYPES.get(first, "number")
                    raise DataError(f"data.text_field: {where} field {field!r} is {value_type}, not a string")
                scanner.take(b'"', "a string")
                found = True
                yield from scanner.string_pieces()
            else:
                scanner.skip_value()
            if scanner.peek() == b"}":
                scanner.take(b"}", "'}'")
                break
            scanner.take(b",", "',' or '}'")
    if scanner.peek() != b"":
        scanner.fail("data after the object")
    if not found:
        raise DataError(f"data.text_field: {where} has no field {field!r}")

"""Streamed UTF-8 text: strict decoding with byte offsets, newline normalisation, split statistics."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llm.io import utf8_error

CHUNK_BYTES = 1 << 20


def iter_text(stream: BinaryIO, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Decode a binary stream as UTF-8 with `\\r\\n`/`\\r` -> `\\n`, yielding pieces that end on a newline.

    Pieces end on line boundaries (except the last) so callers can count words per piece.
    A leading byte-order mark is dropped. Bad bytes raise DataError naming `name` and the byte offset.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed, carry, first = 0, "", True
    while True:
        block = stream.read(chunk_bytes)
        final = not block
        pending = len(decoder.getstate()[0])
        try:
            decoded = decoder.decode(block, final=final)
        except UnicodeDecodeError as exc:
            raise utf8_error(name, exc, consumed - pending) from None
        consumed += len(block)
        if first and decoded:
            decoded, first = decoded.removeprefix("\ufeff"), False
        text = carry + decoded
        held_cr = "\r" if text.endswith("\r") and not final else ""
        text = text[: len(text) - len(held_cr)].replace("\r\n", "\n").replace("\r", "\n")
        cut = len(text) if final else text.rfind("\n") + 1
        if cut:
            yield text[:cut]
        carry = text[cut:] + held_cr
        if final:
            return


def iter_lines(pieces: Iterable[str]) -> Iterator[str]:
    """Split text pieces into lines on `\\n` only, each keeping its `\\n` (the last may lack one).

    Pieces must end on a newline (as `iter_text` yields them), except the very last.
    """
    for piece in pieces:
        start = 0
        while (end := piece.find("\n", start)) != -1:
            yield piece[start : end + 1]
            start = end + 1
        if start < len(piece):
            yield piece[start:]


@dataclass
class SplitStats:
    """Size of one written split: lines, whitespace-separated words and UTF-8 bytes."""

    lines: int = 0
    words: int = 0
    bytes: int = 0

    def summary(self, split: str) -> str:
        """One human-readable line, e.g. `train: 36,718 lines, 2,051,910 words, 10,918,892 bytes`."""
        return f"{split}: {self.lines:,} lines, {self.words:,} words, {self.bytes:,} bytes"


class SplitWriter:
    """Write text pieces to a UTF-8 file while counting lines, words and bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stats = SplitStats()
        self._file = open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115 (closed in close())
        self._ends_line = True  # close() counts an unfinished last line

    def write(self, text: str) -> None:
        """Append text; words are counted per call, so callers pass whole lines or line-ending pieces."""
        if not text:
            return
        self._file.write(text)
        self.stats.lines += text.count("\n")
        self.stats.words += len(text.split())
        self.stats.bytes += len(text.encode("utf-8"))
        self._ends_line = text.endswith("\n")

    def close(self) -> SplitStats:
        """Close the file and return its statistics (a last line without `\\n` still counts)."""
        self._file.close()
        if not self._ends_line:
            self.stats.lines += 1
        return self.stats

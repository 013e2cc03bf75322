"""Streamed UTF-8 text: strict decoding with byte offsets, newline normalisation, split statistics."""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llm.io import utf8_error

CHUNK_BYTES = 1 << 20
_SPACE = re.compile(r"\s")


def iter_text(stream: BinaryIO, name: str, chunk_bytes: int = CHUNK_BYTES,
              on_read: Callable[[int], object] | None = None) -> Iterator[str]:
    """Decode a binary stream as UTF-8 with `\\r\\n`/`\\r` -> `\\n`, yielding pieces of about `chunk_bytes`.

    A piece ends on a newline, unless a line is longer than `chunk_bytes`: then it ends on whitespace
    where the text has some, else anywhere, so that time stays linear and memory bounded on any input
    (one 2 GB line included). A leading byte-order mark is dropped. `on_read(n)` is called with the size
    of every block read (a budget, see llm.data.splits). Bad bytes raise DataError naming `name` and the
    byte offset.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed, carry, cr, first = 0, "", "", True
    while True:
        block = stream.read(chunk_bytes)
        final = not block
        if on_read is not None:
            on_read(len(block))
        pending = len(decoder.getstate()[0])
        try:
            decoded = decoder.decode(block, final=final)
        except UnicodeDecodeError as exc:
            raise utf8_error(name, exc, consumed - pending) from None
        consumed += len(block)
        if first and decoded:
            decoded, first = decoded.removeprefix("\ufeff"), False
        fresh = cr + decoded  # a \r held back from the last block may start a \r\n
        cr = "\r" if fresh.endswith("\r") and not final else ""
        fresh = fresh[: len(fresh) - len(cr)]
        if "\r" in fresh:
            fresh = fresh.replace("\r\n", "\n").replace("\r", "\n")
        text = carry + fresh  # carry holds no newline: only `fresh` needs searching
        newline = fresh.rfind("\n")
        if final:
            cut = len(text)
        elif newline >= 0:
            cut = len(carry) + newline + 1
        elif len(text) >= chunk_bytes:  # a long line: cut it after its last whitespace, else anywhere
            space = _SPACE.search(text[::-1])  # reversed: the scan stops at the last whitespace
            cut = len(text) - space.start() if space else len(text)
        else:
            cut = 0
        if cut:
            yield text[:cut]
        carry = text[cut:]
        if final:
            return


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
        self._in_word = False  # the text so far ends inside a word

    def write(self, text: str) -> None:
        """Append text, which may start or end anywhere: a word cut between two writes counts once."""
        if not text:
            return
        self._file.write(text)
        self.stats.lines += text.count("\n")
        self.stats.words += len(text.split()) - (self._in_word and not text[0].isspace())
        self.stats.bytes += len(text.encode("utf-8"))
        self._ends_line = text.endswith("\n")
        self._in_word = not text[-1].isspace()

    def close(self) -> SplitStats:
        """Close the file and return its statistics (a last line without `\\n` still counts)."""
        self._file.close()
        if not self._ends_line:
            self.stats.lines += 1
        return self.stats

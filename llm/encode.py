"""The encode stage's writer: raw text splits -> bounded `.npy` token shards + meta.json (see llm.shards).

Each split `<raw_dir>/<split>.txt` is streamed in chunks of about `CHUNK_BYTES` cut after a
newline (the cuts depend only on the text), encoded in a pool of worker processes (`imap`,
ordered) and appended to `<split>/shard_NNNNN.npy` files of at most `shard_tokens` tokens, so
peak memory does not grow with the corpus. A line longer than a chunk is cut before a space that
follows a visible ASCII character, where the named BPE patterns start a new piece anyway (tokens
do not change), else at a character boundary: memory stays bounded by two chunks on any line.

Documents: a WikiText article starts at a top-level heading line ``^ = [^=].* = $``.
The end-of-text token (when the tokenizer has one; else nothing separates documents) is
emitted before every such heading except the first one of the file; text before the first
heading belongs to the first document, a text without headings is one document, and
nothing is appended at the end. A tokenizer that ends every line with its own token (the
word-level one) gets no document token, and that token also ends a last line that lacks its
newline: its stream is then the word-level WikiText one papers score, words plus one
end-of-line per line (the `num_words` of meta.json), with headings alone marking articles.
Each document, and each chunk, is encoded separately, so a run of newlines cut by a
chunk boundary is encoded as two runs: deterministic, whatever the worker count.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from multiprocessing.pool import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from llm.config import SPLITS
from llm.errors import DataError
from llm.io import atomic_dir, decode_utf8, sha256_file
from llm.shards import FORMAT_VERSION
from llm.tokenizers import Tokenizer, load_tokenizer

CHUNK_BYTES = 2 << 20
UINT16_VOCAB_LIMIT = 1 << 16
# A top-level heading line, preceded by a newline (the literal prefix makes the scan fast).
_HEADING = re.compile(rb"\n( = [^=\n][^\n]* = )$", re.MULTILINE)
# Reversed bytes of a space that follows a visible ASCII character: where a long line can be cut.
_SPACE_AFTER_WORD_REVERSED = re.compile(rb" [\x21-\x7e]")
_worker_tokenizer: Tokenizer | None = None


def token_dtype(vocab_size: int) -> str:
    """Smallest unsigned dtype that holds every token id: uint16 when vocab_size <= 65536."""
    return "uint16" if vocab_size <= UINT16_VOCAB_LIMIT else "uint32"


class _Chunk(NamedTuple):
    """A piece of a split file (cut after a newline, or inside a long line), with where documents start."""

    path: str
    offset: int                  # byte offset of `data` in the file (for error messages)
    data: bytes
    doc_starts: tuple[int, ...]  # positions in `data` that get an end-of-text token before them
    ends_line: bool              # `data` ends a line (with its newline, or the file's last one without)


def _line_chunks(path: Path, chunk_bytes: int) -> Iterator[tuple[int, bytes, bool, bool]]:
    """(offset, bytes, starts a line, ends a line) pieces of about chunk_bytes, each ending after a
    newline (or at EOF), or inside a line longer than chunk_bytes (see `_long_line_cut`)."""
    offset, carry, line_start = 0, b"", True
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            buffer = carry + data  # carry holds no newline: only the new bytes need searching
            cut = buffer.rfind(b"\n", len(carry)) + 1
            if not cut:
                if len(buffer) < chunk_bytes:  # the file's last line, shorter than a chunk
                    carry = buffer
                    continue
                cut = _long_line_cut(buffer, len(carry))
            ends_line = buffer[cut - 1] == ord("\n")
            yield offset, buffer[:cut], line_start, ends_line
            offset, carry, line_start = offset + cut, buffer[cut:], ends_line
    if carry:
        yield offset, carry, line_start, True


def _long_line_cut(buffer: bytes, fresh: int) -> int:
    """Where to cut a line that outgrew a chunk, in its bytes from `fresh` on (so what is carried stays
    under a chunk): before the last space that follows a visible ASCII character, else before the last
    character."""
    start = max(fresh - 1, 0)
    space = _SPACE_AFTER_WORD_REVERSED.search(buffer[start:][::-1])  # reversed: stops at the last one
    if space:
        return len(buffer) - 1 - space.start()
    cut = len(buffer) - 1
    while cut > start and buffer[cut] & 0xC0 == 0x80:  # back over UTF-8 continuation bytes
        cut -= 1
    return cut or len(buffer)


def heading_starts(data: bytes) -> list[int]:
    """Byte positions of the top-level heading lines (`` = Title = ``) in a text cut on lines."""
    return [match.start(1) - 1 for match in _HEADING.finditer(b"\n" + data)]


def _chunks(path: Path, chunk_bytes: int) -> Iterator[_Chunk]:
    """The split as chunks; documents start at every heading but the file's first one."""
    seen_heading = False
    for offset, data, line_start, ends_line in _line_chunks(path, chunk_bytes):
        starts = [start for start in heading_starts(data) if start or line_start]
        if starts and not seen_heading:
            starts, seen_heading = starts[1:], True
        yield _Chunk(str(path), offset, data, tuple(starts), ends_line)


def _init_worker(tokenizer_path: str) -> None:
    """Pool initializer: load the tokenizer once per worker process."""
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


class _Encoded(NamedTuple):
    """What a worker returns for one chunk."""

    tokens: np.ndarray
    words: int              # whitespace-separated words
    newlines: int
    size: int               # bytes
    edges: tuple[bool, bool]  # whether its first and its last character belong to a word


def _encode_chunk(chunk: _Chunk) -> _Encoded:
    """Worker: the token ids and the counts of one chunk."""
    tok = _worker_tokenizer
    bounds = sorted({0, *chunk.doc_starts, len(chunk.data)})
    separator = tok.eot_id if tok.eol_id is None else None
    ids: list[int] = []
    words = 0
    texts = []
    for begin, end in zip(bounds, bounds[1:]):
        if begin in chunk.doc_starts and separator is not None:
            ids.append(separator)
        text = decode_utf8(chunk.data[begin:end], chunk.path, chunk.offset + begin)
        words += len(text.split())
        ids.extend(tok.encode(text))
        texts.append(text)
    if tok.eol_id is not None and chunk.ends_line and not chunk.data.endswith(b"\n"):  # the file's last
        ids.append(tok.eol_id)  # line, without its newline (a chunk cut inside a line gets none)
    tokens = np.array(ids, dtype=token_dtype(tok.vocab_size))
    edges = (not texts[0][:1].isspace(), not texts[-1][-1:].isspace()) if texts else (False, False)
    return _Encoded(tokens, words, chunk.data.count(b"\n"), len(chunk.data), edges)


class _ShardWriter:
    """Appends tokens to `shard_NNNNN.npy` files of at most `shard_tokens` tokens each.

    Tokens wait in the arrays they came in until a shard is full, so memory follows the text actually
    encoded, not `shard_tokens` (a huge encode.shard_tokens on a small corpus allocates nothing extra).
    """

    def __init__(self, split_dir: Path, shard_tokens: int, dtype: str) -> None:
        split_dir.mkdir(parents=True)
        self.split_dir, self.shard_tokens, self.dtype = split_dir, shard_tokens, dtype
        self.pending: list[np.ndarray] = []
        self.fill = 0
        self.names: list[str] = []
        self.num_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens, writing each shard as soon as it is full."""
        while len(tokens):
            take = min(self.shard_tokens - self.fill, len(tokens))
            self.pending.append(tokens[:take])
            self.fill, tokens = self.fill + take, tokens[take:]
            self.num_tokens += take
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        """Write the waiting tokens (if any) as the next shard."""
        if self.fill:
            name = f"shard_{len(self.names):05d}.npy"
            try:
                shard = np.concatenate(self.pending).astype(self.dtype, copy=False)
            except MemoryError:
                raise DataError(f"encode.shard_tokens = {self.shard_tokens}: a shard of {self.fill:,} tokens "
                                "does not fit in memory; lower encode.shard_tokens in params.yaml") from None
            np.save(self.split_dir / name, shard)
            self.names.append(f"{self.split_dir.name}/{name}")
            self.pending, self.fill = [], 0


def _encode_split(pool: Pool, path: Path, split_dir: Path, *, shard_tokens: int, dtype: str,
                  chunk_bytes: int, progress: bool) -> dict:
    """Stream one split file through the pool into shards; its meta.json entry."""
    size = path.stat().st_size
    writer = _ShardWriter(split_dir, shard_tokens, dtype)
    words = newlines = 0
    in_word = False  # the text before the next chunk ends inside a word
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"encode {path.stem}", disable=not progress) as bar:
        for encoded in pool.imap(_encode_chunk, _chunks(path, chunk_bytes)):
            writer.add(encoded.tokens)
            starts_in_word, ends_in_word = encoded.edges
            words += encoded.words - (in_word and starts_in_word)  # a word cut by a chunk counts once
            newlines, in_word = newlines + encoded.newlines, ends_in_word
            bar.update(encoded.size)
    writer.flush()
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        num_lines = newlines + (f.read(1) != b"\n")
    return {"num_tokens": writer.num_tokens, "num_bytes": size, "num_words": words + num_lines,
            "num_lines": num_lines, "shards": writer.names}


def _check_splits(raw_dir: Path) -> None:
    """DataError before any work when a split file is missing or empty."""
    for split in SPLITS:
        path = raw_dir / f"{split}.txt"
        if not path.is_file():
            raise DataError(f"{path}: not found; run `dvc repro download` (or python stages/download.py)")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the split is empty; check the data section of params.yaml "
                            "and re-download")


def encode_corpus(raw_dir: str | Path, tokenizer_path: str | Path, shards_dir: str | Path, *,
                  shard_tokens: int, num_workers: int = 0, progress: bool = False,
                  chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Encode `<raw_dir>/{train,valid,test}.txt` into `shards_dir` atomically; returns meta.json's content.

    Everything is built beside `shards_dir` and swapped in at the end (`io.atomic_dir`): a failed
    or killed run leaves the previous shards as they were.
    `num_workers` = 0 uses every core. The output is byte-identical for any worker count.
    """
    raw_dir, tokenizer_path, shards_dir = Path(raw_dir), Path(tokenizer_path), Path(shards_dir)
    if not tokenizer_path.is_file():
        raise DataError(f"{tokenizer_path}: not found; run `dvc repro fit_tokenizer` "
                        "(or python stages/fit_tokenizer.py)")
    _check_splits(raw_dir)
    tok = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tok.vocab_size)
    meta = {"format_version": FORMAT_VERSION, "tokenizer_sha256": sha256_file(tokenizer_path),
            "tokenizer_type": json.loads(tokenizer_path.read_text(encoding="utf-8")).get("type"),
            "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "unk_id": tok.unk_id, "dtype": dtype,
            "splits": {}}
    with atomic_dir(shards_dir) as build, Pool(num_workers or os.cpu_count() or 1, initializer=_init_worker,
                                               initargs=(str(tokenizer_path),)) as pool:
        for split in SPLITS:
            meta["splits"][split] = _encode_split(
                pool, raw_dir / f"{split}.txt", build / split, shard_tokens=shard_tokens,
                dtype=dtype, chunk_bytes=chunk_bytes, progress=progress)
        (build / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta

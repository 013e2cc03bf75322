"""The encode stage's writer: raw text splits -> bounded `.npy` token shards + meta.json (see llm.shards).

Each split `<raw_dir>/<split>.txt` is streamed in chunks of about `CHUNK_BYTES` cut after a
newline (the cuts depend only on the text), encoded in a pool of worker processes (`imap`,
ordered) and appended to `<split>/shard_NNNNN.npy` files of at most `shard_tokens` tokens, so
peak memory does not grow with the corpus (a line is never cut: a chunk holds at least one
whole line).

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
_worker_tokenizer: Tokenizer | None = None


def token_dtype(vocab_size: int) -> str:
    """Smallest unsigned dtype that holds every token id: uint16 when vocab_size <= 65536."""
    return "uint16" if vocab_size <= UINT16_VOCAB_LIMIT else "uint32"


class _Chunk(NamedTuple):
    """A piece of a split file cut after a newline, with the offsets where documents start."""

    path: str
    offset: int                  # byte offset of `data` in the file (for error messages)
    data: bytes
    doc_starts: tuple[int, ...]  # positions in `data` that get an end-of-text token before them


def _line_chunks(path: Path, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) pieces of about chunk_bytes, each ending after a newline (or at EOF)."""
    offset, carry = 0, b""
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            buffer = carry + data
            cut = buffer.rfind(b"\n") + 1
            if cut == 0:  # a line longer than the chunk: keep reading until it ends
                carry = buffer
                continue
            yield offset, buffer[:cut]
            offset, carry = offset + cut, buffer[cut:]
    if carry:
        yield offset, carry


def heading_starts(data: bytes) -> list[int]:
    """Byte positions of the top-level heading lines (`` = Title = ``) in a text cut on lines."""
    return [match.start(1) - 1 for match in _HEADING.finditer(b"\n" + data)]


def _chunks(path: Path, chunk_bytes: int) -> Iterator[_Chunk]:
    """The split as chunks; documents start at every heading but the file's first one."""
    seen_heading = False
    for offset, data in _line_chunks(path, chunk_bytes):
        starts = heading_starts(data)
        if starts and not seen_heading:
            starts, seen_heading = starts[1:], True
        yield _Chunk(str(path), offset, data, tuple(starts))


def _init_worker(tokenizer_path: str) -> None:
    """Pool initializer: load the tokenizer once per worker process."""
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode_chunk(chunk: _Chunk) -> tuple[np.ndarray, int, int, int]:
    """Worker: (token ids, whitespace words, newlines, bytes) of one chunk."""
    tok = _worker_tokenizer
    bounds = sorted({0, *chunk.doc_starts, len(chunk.data)})
    separator = tok.eot_id if tok.eol_id is None else None
    ids: list[int] = []
    words = 0
    for begin, end in zip(bounds, bounds[1:]):
        if begin in chunk.doc_starts and separator is not None:
            ids.append(separator)
        text = decode_utf8(chunk.data[begin:end], chunk.path, chunk.offset + begin)
        words += len(text.split())
        ids.extend(tok.encode(text))
    if tok.eol_id is not None and not chunk.data.endswith(b"\n"):  # the file's last line lacks its newline
        ids.append(tok.eol_id)
    tokens = np.array(ids, dtype=token_dtype(tok.vocab_size))
    return tokens, words, chunk.data.count(b"\n"), len(chunk.data)


class _ShardWriter:
    """Appends tokens to `shard_NNNNN.npy` files of at most `shard_tokens` tokens each."""

    def __init__(self, split_dir: Path, shard_tokens: int, dtype: str) -> None:
        split_dir.mkdir(parents=True)
        self.split_dir, self.buffer, self.fill = split_dir, np.empty(shard_tokens, dtype=dtype), 0
        self.names: list[str] = []
        self.num_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens, writing each shard as soon as it is full."""
        while len(tokens):
            take = min(len(self.buffer) - self.fill, len(tokens))
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill, tokens = self.fill + take, tokens[take:]
            self.num_tokens += take
            if self.fill == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        """Write the buffered tokens (if any) as the next shard."""
        if self.fill:
            name = f"shard_{len(self.names):05d}.npy"
            np.save(self.split_dir / name, self.buffer[:self.fill])
            self.names.append(f"{self.split_dir.name}/{name}")
            self.fill = 0


def _encode_split(pool: Pool, path: Path, split_dir: Path, *, shard_tokens: int, dtype: str,
                  chunk_bytes: int, progress: bool) -> dict:
    """Stream one split file through the pool into shards; its meta.json entry."""
    size = path.stat().st_size
    writer = _ShardWriter(split_dir, shard_tokens, dtype)
    words = newlines = 0
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"encode {path.stem}", disable=not progress) as bar:
        for tokens, chunk_words, chunk_newlines, chunk_bytes_read in pool.imap(
                _encode_chunk, _chunks(path, chunk_bytes)):
            writer.add(tokens)
            words, newlines = words + chunk_words, newlines + chunk_newlines
            bar.update(chunk_bytes_read)
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

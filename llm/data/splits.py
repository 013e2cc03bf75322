"""Deterministic train/valid/test splits: by file (seeded shuffle) or by contiguous line ranges."""

from __future__ import annotations

import contextlib
import random
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from llm.config import SPLITS
from llm.data.text import SplitStats, SplitWriter, iter_text
from llm.errors import DataError

# What corrupt zip / tar / gzip streams raise while being read.
READ_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, tarfile.TarError)


@dataclass
class TextSource:
    """One text to read: a name for messages and a way to open it as bytes."""

    name: str
    opener: Callable[[], contextlib.AbstractContextManager[BinaryIO]]

    def pieces(self, budget: ByteBudget | None = None) -> Iterator[str]:
        """Its normalised text in pieces (see `iter_text`), each byte read charged to `budget`; read
        failures become a DataError naming it."""
        try:
            with self.opener() as stream:
                yield from iter_text(stream, self.name, on_read=budget.take if budget else None)
        except READ_ERRORS as exc:
            raise DataError(f"{self.name}: cannot be read ({exc}); if it is a cached download, "
                            "delete it to download again") from None


@dataclass
class ByteBudget:
    """At most `limit` bytes of text read from one corpus (data.max_bytes), counted after decompression:
    a gzip bomb or an endless file stops with one line instead of filling the disk."""

    limit: int
    origin: str
    used: int = 0

    def take(self, count: int) -> None:
        """Charge `count` bytes just read; DataError once the limit is passed."""
        self.used += count
        if self.used > self.limit:
            raise DataError(f"data.max_bytes = {self.limit}: {self.origin} holds more text than that (after "
                            "decompression); raise data.max_bytes in params.yaml if that is expected, or "
                            "check the source")


def file_source(path: Path) -> TextSource:
    """A TextSource for a plain file on disk."""
    return TextSource(str(path), lambda: open(path, "rb"))


@dataclass
class Plan:
    """How to build the splits: whole sources per split (`by_split`) or one text cut by lines (`by_lines`)."""

    by_split: dict[str, list[TextSource]] = field(default_factory=dict)
    by_lines: list[TextSource] = field(default_factory=list)
    origin: str = ""


def _share(count: int, fraction: float) -> int:
    """count * fraction rounded half up (Python's round() would round 0.5 down to 0)."""
    return int(count * fraction + 0.5)


def assign_files(files: list, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list] | None:
    """Split sorted files by a seeded shuffle, or None when some split would get no file.

    Each split keeps its files in the original (sorted) order.
    """
    n_val, n_test = _share(len(files), val_fraction), _share(len(files), test_fraction)
    if n_val < 1 or n_test < 1 or len(files) - n_val - n_test < 1:
        return None
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    picked = {"valid": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    return {split: [files[i] for i in sorted(picked[split])] for split in SPLITS}


def line_ranges(total_lines: int, val_fraction: float, test_fraction: float) -> dict[str, range]:
    """Contiguous line ranges: train first, then test, then the LAST lines for valid (as nanoGPT does)."""
    n_val = max(1, _share(total_lines, val_fraction))
    n_test = max(1, _share(total_lines, test_fraction))
    n_train = total_lines - n_val - n_test
    if n_train < 1:
        raise DataError(f"the corpus has only {total_lines} lines: too few to split into train, test and "
                        "valid; add text or use a directory of train.txt, valid.txt and test.txt")
    return {"train": range(0, n_train), "test": range(n_train, n_train + n_test),
            "valid": range(n_train + n_test, total_lines)}


def _joined(sources: list[TextSource], bar: tqdm | None = None, budget: ByteBudget | None = None
            ) -> Iterator[str]:
    """The sources' text one after another, each file's last line ended so files never merge lines."""
    for index, source in enumerate(sources):
        last = ""
        for piece in source.pieces(budget):
            last = piece
            if bar is not None:
                bar.update(len(piece))
            yield piece
        if last and not last.endswith("\n") and index + 1 < len(sources):
            yield "\n"


def write_plan(plan: Plan, out_dir: Path, val_fraction: float, test_fraction: float,
               progress: bool = True, max_bytes: int | None = None) -> dict[str, SplitStats]:
    """Write `<out_dir>/{train,valid,test}.txt` following `plan`; return the statistics per split.

    Each pass over the sources may read at most `max_bytes` of text (data.max_bytes)."""
    writers = {split: SplitWriter(out_dir / f"{split}.txt") for split in SPLITS}
    # Shown only when the work lasts (delay): a fresh bar would read "0.00char" (unit_scale's decimals).
    bar = tqdm(unit=" chars", unit_scale=True, delay=0.5, desc="writing splits", disable=not progress,
               leave=False)

    def budget() -> ByteBudget | None:
        return ByteBudget(max_bytes, plan.origin) if max_bytes is not None else None

    try:
        if plan.by_lines:
            _write_by_lines(plan.by_lines, writers, val_fraction, test_fraction, bar, budget)
        else:
            whole = budget()
            for split in SPLITS:
                for piece in _joined(plan.by_split[split], bar, whole):
                    writers[split].write(piece)
    finally:
        bar.close()
        stats = {split: writer.close() for split, writer in writers.items()}
    _check_not_empty(plan, stats)
    return stats


def _write_by_lines(sources: list[TextSource], writers: dict[str, SplitWriter], val_fraction: float,
                    test_fraction: float, bar: tqdm, budget: Callable[[], ByteBudget | None]) -> None:
    """Two streamed passes: count the lines, then send each range of lines to its split.

    Pieces may end mid-line (a line longer than a read); a line's pieces all go to its split."""
    total, last = 0, ""
    for piece in _joined(sources, budget=budget()):
        total, last = total + piece.count("\n"), piece
    total += bool(last) and not last.endswith("\n")  # a last line without its newline
    if total == 0:
        names = ", ".join(source.name for source in sources[:5])
        raise DataError(f"empty corpus: {names} holds no text; point data at a non-empty corpus")
    bounds = line_ranges(total, val_fraction, test_fraction)
    owner = [(r.stop, split) for split, r in sorted(bounds.items(), key=lambda item: item[1].start)]
    current, number = 0, 0  # owner[current] holds line `number`, the line the next character is on
    for piece in _joined(sources, bar, budget()):
        while piece:
            stop, split = owner[current]
            newlines = piece.count("\n")
            if number + newlines < stop or current == len(owner) - 1:
                writers[split].write(piece)
                number += newlines
                break
            cut = -1
            for _ in range(stop - number):  # just past the newline that ends the split's last line
                cut = piece.index("\n", cut + 1)
            writers[split].write(piece[:cut + 1])
            piece, number, current = piece[cut + 1:], stop, current + 1


def _check_not_empty(plan: Plan, stats: dict[str, SplitStats]) -> None:
    """Every split must hold at least one word: an empty split breaks tokenizer fitting and evaluation."""
    if all(s.words == 0 for s in stats.values()):
        raise DataError(f"empty corpus: {plan.origin} holds no words; point data at a non-empty corpus")
    for split, split_stats in stats.items():
        if split_stats.words == 0:
            sources = ", ".join(s.name for s in plan.by_split.get(split, [])[:3]) or "its line range"
            raise DataError(f"{plan.origin}: the {split} split is empty (from {sources}); add text, "
                            "change data.val_fraction / data.test_fraction, or pick other members")

"""The text_files source and the split rules: line ranges, by file, as-is; UTF-8 and emptiness errors."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import pytest

from llm.config import SPLITS, DataConfig
from llm.data import prepare_raw
from llm.data.splits import assign_files, line_ranges
from llm.data.text import iter_text
from llm.errors import DataError


def _prepare(tmp_path: Path, folder: Path, out: str = "raw", **data) -> dict[str, bytes]:
    """Run text_files on `folder`; return the bytes of each written split."""
    config = DataConfig(dataset="text_files", text_files_dir=str(folder), **data)
    out_dir = tmp_path / "out" / out
    prepare_raw(config, out_dir, cache_dir=tmp_path / "cache", progress=False)
    return {split: (out_dir / f"{split}.txt").read_bytes() for split in SPLITS}


@pytest.fixture()
def many_files(tmp_path: Path, wikitext_valid: Path) -> Path:
    """20 files, each a slice of real WikiText lines, in nested folders (plus a non-.txt file)."""
    lines = wikitext_valid.read_text(encoding="utf-8").splitlines(keepends=True)
    folder = tmp_path / "many"
    for index in range(20):
        path = folder / f"part{index % 3}" / f"doc{index:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(lines[index * 150 : (index + 1) * 150]), encoding="utf-8")
    (folder / "notes.md").write_text("not a corpus file\n")
    return folder


def test_single_file_splits_by_lines_with_valid_last(tmp_path, shakespeare):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "input.txt").write_bytes(shakespeare.read_bytes())
    out = _prepare(tmp_path, folder, val_fraction=0.2, test_fraction=0.05)
    lines = shakespeare.read_bytes().splitlines(keepends=True)
    n_val, n_test = round(len(lines) * 0.2), round(len(lines) * 0.05)
    assert out["valid"] == b"".join(lines[-n_val:])
    assert out["test"] == b"".join(lines[-n_val - n_test : -n_val])
    assert out["train"] + out["test"] + out["valid"] == shakespeare.read_bytes()  # disjoint and covering
    again = _prepare(tmp_path, folder, out="again", val_fraction=0.2, test_fraction=0.05, seed=7)
    assert again == out  # deterministic (and the seed only matters for by-file splits)


def test_many_files_split_by_file_deterministically(tmp_path, many_files):
    files = {p.read_bytes() for p in many_files.rglob("*.txt")}
    out = _prepare(tmp_path, many_files, val_fraction=0.1, test_fraction=0.15)
    pieces = {split: _documents(out[split], files) for split in SPLITS}
    assert [len(pieces[s]) for s in SPLITS] == [15, 2, 3]
    assert set().union(*pieces.values()) == files and sum(map(len, pieces.values())) == 20
    assert _prepare(tmp_path, many_files, out="same", val_fraction=0.1, test_fraction=0.15) == out
    other = _prepare(tmp_path, many_files, out="other", val_fraction=0.1, test_fraction=0.15, seed=1)
    assert other != out


def _documents(text: bytes, files: set[bytes]) -> set[bytes]:
    """Which of `files` a split is made of: it must be exactly their concatenation, in sorted order."""
    found = {f for f in files if f in text}
    assert sum(len(f) for f in found) == len(text)
    return found


def test_assign_files_needs_a_file_for_every_split():
    assert assign_files(list("abcd"), 0.1, 0.1, 0) is None
    split = assign_files(list("abcde"), 0.1, 0.1, 0)
    assert split is not None and [len(split[s]) for s in SPLITS] == [3, 1, 1]
    assert all(split[s] == sorted(split[s]) for s in SPLITS)


def test_line_ranges_cover_every_line_once():
    ranges = line_ranges(1001, 0.1, 0.2)
    assert (ranges["train"].stop, ranges["test"].stop, ranges["valid"].stop) == (701, 901, 1001)
    with pytest.raises(DataError, match="only 2 lines"):
        line_ranges(2, 0.1, 0.1)


def test_few_files_are_joined_then_split_by_lines(tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    (folder / "a.txt").write_text("".join(f"a{i}\n" for i in range(50)) + "a-last-without-newline")
    (folder / "b.txt").write_text("".join(f"b{i}\n" for i in range(49)))
    out = _prepare(tmp_path, folder)
    joined = (out["train"] + out["test"] + out["valid"]).decode()
    assert joined.splitlines() == [f"a{i}" for i in range(50)] + ["a-last-without-newline"] + \
        [f"b{i}" for i in range(49)]
    assert out["valid"].decode().splitlines() == [f"b{i}" for i in range(39, 49)]


def test_train_valid_test_folder_is_used_as_is(tmp_path):
    folder = tmp_path / "ready"
    folder.mkdir()
    for split in SPLITS:
        (folder / f"{split}.txt").write_bytes(f"the {split} text\r\nline two\r".encode())
    out = _prepare(tmp_path, folder)
    assert out == {split: f"the {split} text\nline two\n".encode() for split in SPLITS}
    (folder / "extra.txt").write_text("more\n")
    with pytest.raises(DataError, match="plus 1 other"):
        _prepare(tmp_path, folder, out="extra")


def test_relative_folder_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "input.txt").write_text("".join(f"line {i}\n" for i in range(30)))
    monkeypatch.chdir(tmp_path)
    assert _prepare(tmp_path, Path("corpus"))["valid"] == b"line 27\nline 28\nline 29\n"


def test_non_utf8_file_names_file_and_byte_offset(tmp_path):
    folder = tmp_path / "latin1"
    folder.mkdir()
    (folder / "input.txt").write_bytes(b"ok line\n" * 1000 + "caf\u00e9\n".encode("latin-1"))
    expected = r"latin1/input\.txt: not valid UTF-8 at byte 8003 \(bad byte 0xe9\)"
    with pytest.raises(DataError, match=expected):
        _prepare(tmp_path, folder)
    assert not (tmp_path / "out" / "raw").exists()


def test_byte_offset_is_exact_across_chunk_boundaries():
    data = "\u00e9".encode() * 10 + b"\xff"
    with pytest.raises(DataError, match="at byte 20 "):
        list(iter_text(io.BytesIO(data), "x", chunk_bytes=3))


def test_iter_text_normalises_newlines_split_across_chunks_and_drops_a_bom():
    data = "\ufeffa\r\nb\rc\r\n\u00e9\n".encode()
    for size in range(1, 8):
        pieces = list(iter_text(io.BytesIO(data), "x", chunk_bytes=size))
        assert "".join(pieces) == "a\nb\nc\n\u00e9\n"
        if size > 3:  # every line fits in a read: pieces end on newlines
            assert all(p.endswith("\n") for p in pieces)


class OneLine:
    """A stream of one line, `unit` repeated `times` times (no newline), made as it is read."""

    def __init__(self, unit: bytes, times: int) -> None:
        self.unit, self.position, self.size = unit, 0, len(unit) * times

    def read(self, count: int) -> bytes:
        count = min(count, self.size - self.position)
        skip = self.position % len(self.unit)
        self.position += count
        return (self.unit * ((skip + count) // len(self.unit) + 1))[skip:skip + count]


@pytest.mark.parametrize("unit", [b"lorem ipsum ", b"x", "\u65e5\u672c".encode()])
def test_one_long_line_streams_in_bounded_memory(unit):
    """A 16 MB line used to be carried whole and rescanned on every read: quadratic time (39 s for
    200 MB) and memory that grew with the line. Pieces are now cut on whitespace, else anywhere."""
    chunk = 1 << 18
    tracemalloc.start()
    try:
        total = peak_piece = 0
        line = OneLine(unit, (16 << 20) // len(unit))
        for piece in iter_text(line, "x", chunk_bytes=chunk):
            total, peak_piece = total + len(piece.encode()), max(peak_piece, len(piece))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == line.size
    assert peak_piece <= 2 * chunk and peak < 16 * chunk


def test_word_and_line_counts_stay_exact_when_lines_are_cut(tmp_path):
    """Lines longer than a read (1 MiB) reach the splits in pieces: a word cut between two pieces still
    counts once, and every line goes whole to one split."""
    long_words = "word " * 300_000  # 1.5 MB of words on one line
    one_word = "y" * 1_500_000  # a 1.5 MB word: cut anywhere
    lines = [f"line {i}\n" for i in range(40)]
    text = "".join(lines[:20]) + long_words + "\n" + one_word + " tail\n" + "".join(lines[20:]) + one_word
    folder = tmp_path / "long"
    folder.mkdir()
    (folder / "input.txt").write_text(text)
    config = DataConfig(dataset="text_files", text_files_dir=str(folder), val_fraction=0.1, test_fraction=0.1)
    stats = prepare_raw(config, tmp_path / "raw", progress=False)
    out = {split: (tmp_path / "raw" / f"{split}.txt").read_text() for split in SPLITS}
    assert out["train"] + out["test"] + out["valid"] == text
    for split in SPLITS:
        assert stats[split].words == len(out[split].split()), split
        assert stats[split].lines == len(out[split].splitlines()), split
    assert out["valid"].endswith(one_word) and out["train"].endswith("line 32\n")  # 43 lines: 35, 4, 4


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: None, "no such folder"),
    (lambda d: (d.mkdir(), (d / "x.md").write_text("x")), r"no \*\.txt files found"),
    (lambda d: (d.mkdir(), (d / "a.txt").write_text(""), (d / "b.txt").write_text("")), "empty corpus"),
    (lambda d: (d.mkdir(), (d / "a.txt").write_text("\n \n\n")), "empty corpus"),
    (lambda d: (d.mkdir(), (d / "a.txt").write_text("words " * 50 + "\n" * 20)), "the valid split is empty"),
])
def test_unusable_folders_raise_clear_errors(tmp_path, setup, message):
    folder = tmp_path / "corpus"
    setup(folder)
    with pytest.raises(DataError, match=message):
        _prepare(tmp_path, folder)
    assert not (tmp_path / "out" / "raw").exists()


def test_a_killed_runs_staging_folder_is_removed_and_the_old_splits_replaced(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "input.txt").write_text("".join(f"line {i}\n" for i in range(30)))
    out = tmp_path / "out"
    (out / ".tmp-raw-killed" / "raw").mkdir(parents=True)  # what a SIGKILL mid-download leaves
    (out / "raw").mkdir()
    (out / "raw" / "stale.txt").write_text("from an older run")
    assert _prepare(tmp_path, folder)["valid"] == b"line 27\nline 28\nline 29\n"
    assert sorted(p.name for p in out.iterdir()) == ["raw"]
    assert sorted(p.name for p in (out / "raw").iterdir()) == ["test.txt", "train.txt", "valid.txt"]

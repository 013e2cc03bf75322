"""The encode stage's writer: documents, shard bounds, dtype, counts, workers, atomicity, errors."""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import llm.encode
from llm.config import SPLITS
from llm.encode import encode_corpus, heading_starts, token_dtype
from llm.errors import DataError
from llm.shards import read_meta
from llm.tokenizers import BPETokenizer, SimpleTokenizer, load_tokenizer

WIKI_DOCS = [" \n = First = \n \n Some text , here .\n\n\n = = Sub = = \n more\n",
             " = Second = \n \n Body two .\n",
             " = Third = \n last line without newline"]


class ByteTokenizer:
    """Stand-in tokenizer: id = byte + offset, end-of-text = 256 + offset (offset fakes a big vocabulary)."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.eot_id = 256 + offset
        self.vocab_size = 257 + offset
        self.special_tokens = {"<|endoftext|>": self.eot_id}
        self.unk_id = self.eol_id = None  # lossless, newlines are bytes like any other

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory: pytest.TempPathFactory, shakespeare: Path) -> Path:
    """A small real byte-level BPE with <|endoftext|>, fitted once for the module."""
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    BPETokenizer.train(shakespeare.read_text(encoding="utf-8")[:100_000], vocab_size=400).save(path)
    return path


def _load_standin(path: str | Path) -> ByteTokenizer:
    return ByteTokenizer(json.loads(Path(path).read_text())["offset"])


@pytest.fixture
def byte_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A function writing a stand-in tokenizer.json; forked workers (Linux) inherit the patched loader."""
    monkeypatch.setattr(llm.encode, "load_tokenizer", _load_standin)

    def write(offset: int = 0) -> Path:
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps({"type": "bytes", "version": 1, "offset": offset}))
        return path
    return write


def write_raw(root: Path, texts: dict[str, str | bytes]) -> Path:
    """data/raw/<split>.txt under root; splits not given get a short default text."""
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        text = texts.get(split, f"the {split} split\n")
        (raw / f"{split}.txt").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return raw


def all_tokens(shards_dir: Path, split: str) -> np.ndarray:
    meta = read_meta(shards_dir)
    return np.concatenate([np.load(shards_dir / name) for name in meta["splits"][split]["shards"]])


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_heading_starts_finds_only_top_level_headings() -> None:
    text = b" = A = \n = = B = = \n x = y = \n = C = \n=  D = \n = E =\n = F = "
    assert heading_starts(text) == [0, text.index(b" = C = "), text.index(b" = F = ")]
    assert heading_starts(b"no headings\n") == []


def test_token_dtype_switches_at_65536() -> None:
    assert token_dtype(256) == "uint16"
    assert token_dtype(65536) == "uint16"
    assert token_dtype(65537) == "uint32"


def test_round_trip_puts_eot_between_documents(tmp_path: Path, byte_tokenizer) -> None:
    text = "".join(WIKI_DOCS)
    raw = write_raw(tmp_path, {"train": text})
    meta = encode_corpus(raw, byte_tokenizer(), tmp_path / "shards", shard_tokens=1000, num_workers=1)
    tok = ByteTokenizer()
    expected = tok.encode(WIKI_DOCS[0])
    for doc in WIKI_DOCS[1:]:
        expected += [tok.eot_id, *tok.encode(doc)]
    assert all_tokens(tmp_path / "shards", "train").tolist() == expected
    info = meta["splits"]["train"]
    assert info["num_tokens"] == len(expected)
    assert info["num_bytes"] == len(text.encode())
    assert info["num_lines"] == text.count("\n") + 1  # the last line has no newline
    assert info["num_words"] == len(text.split()) + info["num_lines"]
    assert meta["dtype"] == "uint16" and meta["eot_id"] == 256 and meta["tokenizer_type"] == "bytes"


@pytest.mark.slow
def test_bpe_round_trip_of_wikitext_articles(tmp_path: Path, bpe_file: Path, wikitext_valid: Path) -> None:
    text = wikitext_valid.read_text(encoding="utf-8")
    raw = write_raw(tmp_path, {"valid": text})
    meta = encode_corpus(raw, bpe_file, tmp_path / "shards", shard_tokens=100_000, num_workers=2)
    tok = load_tokenizer(bpe_file)
    parts = re.split(r"(?m)^(?= = [^=\n]+ = $)", text)
    documents = [parts[0] + parts[1], *parts[2:]]  # the blank line before the first heading joins it
    assert len(documents) == 60
    expected = tok.encode(documents[0])
    for document in documents[1:]:
        expected += [tok.eot_id, *tok.encode(document)]
    assert all_tokens(tmp_path / "shards", "valid").tolist() == expected
    assert meta["tokenizer_type"] == "bpe" and meta["eot_id"] == tok.eot_id


def test_bpe_shards_decode_to_the_text_for_small_chunks(tmp_path: Path, bpe_file: Path,
                                                        wikitext_valid: Path) -> None:
    text = wikitext_valid.read_text(encoding="utf-8")[:200_000]
    raw = write_raw(tmp_path, {"test": text})
    encode_corpus(raw, bpe_file, tmp_path / "shards", shard_tokens=5000, num_workers=2, chunk_bytes=1000)
    tok = load_tokenizer(bpe_file)
    tokens = all_tokens(tmp_path / "shards", "test")
    assert tok.decode(tokens[tokens != tok.eot_id].tolist()) == text


def test_text_without_headings_is_one_document(tmp_path: Path, byte_tokenizer, shakespeare: Path) -> None:
    text = shakespeare.read_text(encoding="utf-8")[:50_000]
    raw = write_raw(tmp_path, {"valid": text})
    encode_corpus(raw, byte_tokenizer(), tmp_path / "shards", shard_tokens=4096, num_workers=1,
                  chunk_bytes=3000)
    assert all_tokens(tmp_path / "shards", "valid").tolist() == ByteTokenizer().encode(text)


def test_shards_respect_the_size_bound(tmp_path: Path, byte_tokenizer, shakespeare: Path) -> None:
    text = shakespeare.read_text(encoding="utf-8")[:20_000]
    raw = write_raw(tmp_path, {"train": text})
    meta = encode_corpus(raw, byte_tokenizer(), tmp_path / "shards", shard_tokens=777, num_workers=1,
                         chunk_bytes=2000)
    names = meta["splits"]["train"]["shards"]
    sizes = [len(np.load(tmp_path / "shards" / name)) for name in names]
    assert names[:2] == ["train/shard_00000.npy", "train/shard_00001.npy"]
    assert sizes[:-1] == [777] * (len(sizes) - 1) and 0 < sizes[-1] <= 777
    assert sum(sizes) == len(text.encode())


def test_a_line_longer_than_a_chunk_is_cut_without_changing_its_tokens_or_counts(
        tmp_path: Path, bpe_file: Path, shakespeare: Path) -> None:
    """A long line used to be carried whole, re-joined on every read (quadratic) and encoded as one chunk.
    It is now cut before a space after a word, where the named patterns cut anyway; a word longer than a
    chunk is cut at a character boundary and still counts as one word."""
    line = " ".join(shakespeare.read_text(encoding="utf-8")[:40_000].split())  # ~33 KB, 16 chunks
    word = "x" * 3000 + "\u00e9" * 2000  # 7 KB without whitespace
    text = f"{line}\n{word} {line[:5000]}\n{word}"
    raw = write_raw(tmp_path, {"train": text})
    meta = encode_corpus(raw, bpe_file, tmp_path / "shards", shard_tokens=100_000, num_workers=1,
                         chunk_bytes=2000)
    tokenizer = load_tokenizer(bpe_file)
    ids = all_tokens(tmp_path / "shards", "train").tolist()
    assert tokenizer.decode(ids) == text
    assert ids[:len(tokenizer.encode(line + "\n"))] == tokenizer.encode(line + "\n")
    assert meta["splits"]["train"]["num_words"] == len(text.split()) + 3  # words + lines


def test_chunks_of_one_long_line_stay_under_two_chunk_sizes(tmp_path: Path) -> None:
    path = tmp_path / "line.txt"
    path.write_bytes(b"word " * (1 << 20) + b"x" * (1 << 20))  # a 6 MiB line, its last MiB one word
    sizes = [len(data) for _, data, _, _ in llm.encode._line_chunks(path, 1 << 16)]
    assert sum(sizes) == path.stat().st_size and max(sizes) <= 2 << 16


def test_word_level_lines_cut_into_chunks_still_end_with_one_eol_each(tmp_path: Path) -> None:
    """<eol> ends a line, and the file's last line without a newline; never a chunk cut inside a line."""
    line = " ".join(f"w{i % 50}" for i in range(3000))  # ~14 KB: seven chunks of 2,000 bytes
    text = f"{line}\n{line}"
    tokenizer = SimpleTokenizer.train(text, vocab_size=60)
    tokenizer.save(tmp_path / "tokenizer.json")
    raw = write_raw(tmp_path, {"train": text})
    meta = encode_corpus(raw, tmp_path / "tokenizer.json", tmp_path / "shards", shard_tokens=100_000,
                         num_workers=1, chunk_bytes=2000)
    tokens = all_tokens(tmp_path / "shards", "train")
    assert (tokens == tokenizer.eol_id).sum() == 2 and len(tokens) == 2 * 3000 + 2
    assert meta["splits"]["train"]["num_words"] == len(text.split()) + 2


def test_a_cut_inside_a_line_never_starts_a_document(tmp_path: Path, bpe_file: Path) -> None:
    """A chunk that begins inside a line (` = Bar = ` after a cut) is not a heading line."""
    text = " = First = \n" + "a" * (4000 - 12 - 2) + " = Bar = \nnext line\n"  # reads end at ` =`
    raw = write_raw(tmp_path, {"train": text})
    chunks = [data for _, data, _, _ in llm.encode._line_chunks(raw / "train.txt", 2000)]
    assert chunks[2].startswith(b" = Bar = \n")
    encode_corpus(raw, bpe_file, tmp_path / "shards", shard_tokens=10_000, num_workers=1, chunk_bytes=2000)
    tokenizer = load_tokenizer(bpe_file)
    ids = all_tokens(tmp_path / "shards", "train").tolist()
    assert tokenizer.eot_id not in ids and tokenizer.decode(ids) == text


def test_memory_follows_the_text_not_the_shard_size_bound(tmp_path: Path, byte_tokenizer,
                                                        shakespeare: Path) -> None:
    """encode.shard_tokens up to its bound (2**30) on a small corpus: no 2-4 GB buffer up front."""
    text = shakespeare.read_text(encoding="utf-8")[:20_000]
    raw = write_raw(tmp_path, {"train": text})
    tracemalloc.start()  # numpy reports its allocations to tracemalloc
    try:
        meta = encode_corpus(raw, byte_tokenizer(), tmp_path / "shards", shard_tokens=1 << 30, num_workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert meta["splits"]["train"]["shards"] == ["train/shard_00000.npy"]
    assert all_tokens(tmp_path / "shards", "train").tolist() == list(text.encode())
    assert peak < 50 << 20


def test_big_vocabulary_is_stored_as_uint32(tmp_path: Path, byte_tokenizer) -> None:
    raw = write_raw(tmp_path, {"train": "".join(WIKI_DOCS)})
    meta = encode_corpus(raw, byte_tokenizer(offset=70_000), tmp_path / "shards", shard_tokens=1000,
                         num_workers=1)
    tokens = np.load(tmp_path / "shards" / meta["splits"]["train"]["shards"][0])
    assert meta["dtype"] == "uint32" and tokens.dtype == np.uint32
    assert tokens.min() >= 70_000 and (tokens == 70_256).sum() == 2


def test_word_level_vocabulary_over_65536_words(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(70_000)]
    tokenizer = SimpleTokenizer.train(" ".join(words), vocab_size=70_004)
    tokenizer.save(tmp_path / "tokenizer.json")
    raw = write_raw(tmp_path, {"train": " = A = \n" + " ".join(words[::-1]) + "\n = B = \n"})
    meta = encode_corpus(raw, tmp_path / "tokenizer.json", tmp_path / "shards", shard_tokens=100_000,
                         num_workers=1)
    tokens = all_tokens(tmp_path / "shards", "train")
    assert meta["dtype"] == "uint32" and meta["tokenizer_type"] == "simple" and tokens.dtype == np.uint32
    assert tokens.max() == 70_003 and meta["unk_id"] == tokenizer.unk_id
    # Lines end in <eol>; articles get no end-of-text token (the headings mark them, as in WikiText's stream)
    assert (tokens == tokenizer.eol_id).sum() == 3 and (tokens == tokenizer.eot_id).sum() == 0


def test_word_level_tokens_are_words_plus_lines(tmp_path: Path, wikitext_valid: Path) -> None:
    """Each split encoded by the word-level tokenizer has exactly as many tokens as meta.json counts words
    (whitespace words + one per line): on WikiText-2 valid, the 217,646 of word-level papers."""
    text = wikitext_valid.read_text(encoding="utf-8")
    SimpleTokenizer.train(text, vocab_size=5000).save(tmp_path / "tokenizer.json")
    raw = write_raw(tmp_path, {"train": text[:300_000], "valid": text, "test": text[300_000:400_000]})
    meta = encode_corpus(raw, tmp_path / "tokenizer.json", tmp_path / "shards", shard_tokens=1 << 20,
                         num_workers=2, chunk_bytes=100_000)
    for split, info in meta["splits"].items():
        assert info["num_tokens"] == info["num_words"], split
    assert meta["splits"]["valid"]["num_tokens"] == 213_886 + 3_760


def test_wikitext_valid_counts(tmp_path: Path, byte_tokenizer, wikitext_valid: Path) -> None:
    raw = write_raw(tmp_path, {"valid": wikitext_valid.read_bytes()})
    meta = encode_corpus(raw, byte_tokenizer(), tmp_path / "shards", shard_tokens=1 << 20, num_workers=1)
    info = meta["splits"]["valid"]
    assert info["num_words"] == 217_646
    assert info["num_lines"] == 3_760
    assert info["num_bytes"] == 1_121_681
    assert info["num_tokens"] == 1_121_681 + 59  # 60 articles: an eot before each but the first


def test_output_is_identical_for_one_and_two_workers(tmp_path: Path, bpe_file: Path,
                                                     wikitext_valid: Path) -> None:
    raw = write_raw(tmp_path, {"train": wikitext_valid.read_bytes()[:300_000]})
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}" / "shards"
        encode_corpus(raw, bpe_file, out, shard_tokens=20_000, num_workers=workers, chunk_bytes=8192)
        outputs.append(tree_bytes(out))
    assert outputs[0] == outputs[1]
    assert len([name for name in outputs[0] if name.startswith("train/")]) > 3


def test_stale_temp_dirs_are_removed_and_result_unchanged(tmp_path: Path, byte_tokenizer) -> None:
    tokenizer = byte_tokenizer()
    raw = write_raw(tmp_path, {"train": "".join(WIKI_DOCS)})
    clean = tmp_path / "clean" / "shards"
    encode_corpus(raw, tokenizer, clean, shard_tokens=1000, num_workers=1)
    data = tmp_path / "data"
    (data / ".tmp-shards-killed" / "train").mkdir(parents=True)
    (data / ".tmp-shards-killed" / "train" / "shard_00000.npy").write_bytes(b"half")
    (data / "shards").mkdir()
    (data / "shards" / "meta.json").write_text("{}")
    encode_corpus(raw, tokenizer, data / "shards", shard_tokens=1000, num_workers=1)
    assert sorted(p.name for p in data.iterdir()) == ["shards"]
    assert tree_bytes(data / "shards") == tree_bytes(clean)


def test_failure_leaves_previous_shards_and_no_temp_dir(tmp_path: Path, byte_tokenizer) -> None:
    tokenizer = byte_tokenizer()
    data = tmp_path / "data"
    raw = write_raw(tmp_path, {"train": "".join(WIKI_DOCS)})
    encode_corpus(raw, tokenizer, data / "shards", shard_tokens=1000, num_workers=1)
    before = tree_bytes(data / "shards")
    (raw / "test.txt").write_bytes(b"good line\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"test\.txt: not valid UTF-8 at byte 14"):
        encode_corpus(raw, tokenizer, data / "shards", shard_tokens=1000, num_workers=1)
    assert sorted(p.name for p in data.iterdir()) == ["shards"]
    assert tree_bytes(data / "shards") == before


@pytest.mark.parametrize("problem, match", [("missing", r"valid\.txt: not found"),
                                            ("empty", r"valid\.txt: the split is empty")])
def test_bad_split_is_a_data_error(tmp_path: Path, byte_tokenizer, problem: str, match: str) -> None:
    raw = write_raw(tmp_path, {})
    if problem == "missing":
        (raw / "valid.txt").unlink()
    else:
        (raw / "valid.txt").write_bytes(b"")
    with pytest.raises(DataError, match=match):
        encode_corpus(raw, byte_tokenizer(), tmp_path / "shards", shard_tokens=1000, num_workers=1)


def test_missing_tokenizer_is_a_data_error(tmp_path: Path) -> None:
    raw = write_raw(tmp_path, {})
    with pytest.raises(DataError, match=r"tokenizer\.json: not found; run `dvc repro fit_tokenizer`"):
        encode_corpus(raw, tmp_path / "tokenizer.json", tmp_path / "shards", shard_tokens=1000)

"""Byte-level BPE training: count pre-tokenized words once, then merge with incremental pair counts.

Words are held as `str`s whose characters are token ids (``chr(id)``), so a merge inside a word is
one C-level ``str.replace`` and a pair is a 2-character string. Pair counts are weighted by word
frequency; each pair knows the words it occurs in, so a merge touches only those words. The best pair
comes from a lazy max-heap ordered by (count desc, left bytes, right bytes).
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import islice

from tqdm.auto import tqdm

from llm.errors import TokenizerError
from llm.tokenizers.patterns import (
    SPACE_CUT,
    is_space_cuttable,
    make_splitter,
    piece_values,
    words_of_pieces,
)

PARALLEL_MIN_CHARS = 8_000_000  # below this, forking workers costs more than it saves
MAX_TOKEN_ID = 0x10FFFF  # ids live in str characters


def _alone(word: str) -> list[str]:
    return [word]


def _count_texts(texts: Sequence[str], pattern: str) -> Counter[str]:
    """Pre-tokenized word -> occurrences over `texts`, running the regex once per distinct space-cut piece."""
    findall = make_splitter(pattern)
    words: Counter[str] = Counter()
    if not is_space_cuttable(pattern):
        for text in texts:
            words.update(findall(text))
        return words
    pieces: Counter[str] = Counter()
    ends = []  # the first and last piece of each text, which are not shared with other texts
    for text in texts:
        parts = SPACE_CUT.split(text)
        ends.append(parts[0])
        if len(parts) > 1:
            ends.append(" " + parts[-1])
            pieces.update(islice(parts, 1, len(parts) - 1))
    once = [piece for piece, count in pieces.items() if count == 1]
    for _, found, _ in words_of_pieces(findall, once):  # pieces seen once: their words count once each
        words.update(found)
    for group, found, one_each in words_of_pieces(findall, [p for p, count in pieces.items() if count > 1]):
        if one_each:
            for piece, word in zip(group, found):
                words[word] += pieces[piece]
            continue
        for piece, piece_words in zip(group, piece_values(group, found, _alone)):
            count = pieces[piece]
            for word in piece_words:
                words[word] += count
    for end in ends:
        words.update(findall(end))
    return words


def _cut(text: str, size: int) -> list[str]:
    """`text` cut into pieces of about `size` chars at SPACE_CUT boundaries (which never change matches)."""
    chunks, start = [], 0
    while len(text) - start > size:
        cut = text.find(" ", start + size)
        while cut != -1 and text[cut - 1].isspace():
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


def count_words(texts: Sequence[str], pattern: str, num_workers: int = 0) -> Counter[str]:
    """Word counts of all texts; large corpora are counted in parallel (same result either way)."""
    total = sum(map(len, texts))
    workers = min(num_workers or os.cpu_count() or 1, max(1, total // (PARALLEL_MIN_CHARS // 2)))
    if workers <= 1 or total < PARALLEL_MIN_CHARS:
        words = _count_texts(texts, pattern)
    else:
        size = total // (workers * 4) + 1
        pieces = [c for t in texts for c in _cut(t, size)] if is_space_cuttable(pattern) else list(texts)
        jobs = [(pieces[i::workers], pattern) for i in range(workers)]
        with multiprocessing.get_context("fork" if os.name == "posix" else "spawn").Pool(workers) as pool:
            parts = pool.starmap(_count_texts, jobs)
        words = parts[0]
        for part in parts[1:]:
            words.update(part)
    if sum(len(word) * count for word, count in words.items()) != total:
        raise TokenizerError(f"pattern {pattern!r} skips some characters of the text, so encoding would lose "
                             "them; make it match everything (e.g. end it with |\\s+|.)")
    return words


def _pairs(word: str) -> map:
    """The adjacent token pairs of a word, as 2-character strings."""
    return map(str.__add__, word[:-1], word[1:])


def _pair_index(words: Counter[str]) -> tuple[list[str], list[int], defaultdict, defaultdict]:
    """Words of 2+ bytes as byte strings (one char per byte), their counts, and per pair: the count
    weighted by word frequency and the indices of the words holding it."""
    seqs, freqs = [], []
    for word, count in words.items():
        seq = word.encode("utf-8").decode("latin-1")
        if len(seq) > 1:
            seqs.append(seq)
            freqs.append(count)
    counts: defaultdict[str, int] = defaultdict(int)
    where: defaultdict[str, set[int]] = defaultdict(set)
    for index, (seq, freq) in enumerate(zip(seqs, freqs)):
        for pair in _pairs(seq):
            counts[pair] += freq
            where[pair].add(index)
    return seqs, freqs, counts, where


def _replace_pair(seqs: list[str], freqs: list[int], counts: defaultdict, where: defaultdict, pair: str,
                  new_char: str) -> dict[str, int]:
    """Merge `pair` into `new_char` in every word holding it; lower the counts of the neighbouring pairs
    it breaks and return the counts of the new pairs (containing new_char) it makes."""
    gained: dict[str, int] = {}
    for index in where.pop(pair):
        seq = seqs[index]
        at = seq.find(pair)
        if at < 0:  # the word lost this pair to an earlier merge
            continue
        freq, last = freqs[index], len(seq) - 2
        seqs[index] = seq.replace(pair, new_char)
        prev_end = -1
        while at >= 0:
            if at:  # left neighbour: (x, A) becomes (x, C), or (C, C) right after another occurrence
                counts[seq[at - 1:at + 1]] -= freq
                new = (new_char if prev_end == at else seq[at - 1]) + new_char
                gained[new] = gained.get(new, 0) + freq
                where[new].add(index)
            nxt = seq.find(pair, at + 2)
            if at < last and nxt != at + 2:  # right neighbour, unless it starts the next occurrence
                counts[seq[at + 1:at + 3]] -= freq
                new = new_char + seq[at + 2]
                gained[new] = gained.get(new, 0) + freq
                where[new].add(index)
            prev_end, at = at + 2, nxt
    return gained


def learn_merges(words: Counter[str], num_merges: int, min_frequency: int = 2,
                 progress: bool = False) -> list[tuple[int, int]]:
    """Up to `num_merges` merges (pairs of ids; merge k makes id 256 + k) learned from word counts."""
    if 256 + num_merges > MAX_TOKEN_ID:
        raise TokenizerError(f"vocab_size {256 + num_merges} is too large: at most {MAX_TOKEN_ID} tokens")
    seqs, freqs, counts, where = _pair_index(words)
    token_bytes = [bytes([i]) for i in range(256)]
    token_id = {b: i for i, b in enumerate(token_bytes)}
    heap = [(-count, token_bytes[ord(p[0])], token_bytes[ord(p[1])], p) for p, count in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    bar = tqdm(total=num_merges, desc="bpe merges", unit="merge", disable=not progress)
    while heap and len(merges) < num_merges:
        neg_count, left, right, pair = heapq.heappop(heap)
        count = counts.get(pair, 0)
        if count != -neg_count:  # stale: re-queue a lowered count; a raised one has a fresher entry
            if 0 < count < -neg_count:
                heapq.heappush(heap, (-count, left, right, pair))
            continue
        if count < min_frequency:
            break
        merged = left + right
        new_id = token_id.get(merged)
        if new_id is None:  # token byte strings stay unique: an existing one is reused, not re-added
            new_id = token_id[merged] = len(token_bytes)
            token_bytes.append(merged)
            merges.append((ord(pair[0]), ord(pair[1])))
            bar.update()
        gained = _replace_pair(seqs, freqs, counts, where, pair, chr(new_id))
        del counts[pair]
        for new, gain in gained.items():
            counts[new] += gain
            heapq.heappush(heap, (-counts[new], token_bytes[ord(new[0])], token_bytes[ord(new[1])], new))
    bar.close()
    return merges

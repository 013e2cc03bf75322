"""The fast BPE encoder: word and piece caches, and two merge engines for what the plain loop does slowly.

`bpe.merge` is the algorithm: within one pre-tokenized word, repeatedly merge the adjacent pair of
lowest rank. `CachedEncoder` gives the same ids faster:

- a word seen before is looked up (`words`, pre-filled with every word that is a single token);
- between two `SPACE_CUT` cuts of the named patterns, a whole piece of text (e.g. " the cat,") is
  looked up (`pieces`), so most text needs neither the regex nor a merge;
- new words are merged many at once by `merge_batch` (numpy: one merge per word per step), one at a
  time by the plain loop when there are only a few, or by `merge_long` (a heap, O(n log n)) when a
  word is longer than `LONG_WORD` bytes, where the plain loop would be quadratic.
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Callable, Iterable
from itertools import chain

import numpy as np

from llm.errors import TokenizerError
from llm.tokenizers.patterns import (
    SPACE_CUT,
    is_space_cuttable,
    make_splitter,
    piece_values,
    words_of_pieces,
)

CACHE_LIMIT = 200_000  # cached words / pieces before a cache is emptied: ~50 MB each, per encode worker
LONG_WORD = 256  # bytes; longer words are merged with a heap instead of rescanning (avoids O(n^2))
BATCH_MIN = 64  # uncached words; fewer are merged one by one (numpy's per-call cost outweighs its speed)
MergeWord = Callable[[bytes, dict[bytes, int]], list[int]]


class _Memo(dict):
    """A dict that fills a missing key by calling `compute(key)`, emptying itself when it grows too big."""

    def __init__(self, compute: Callable[[str], list[int]]) -> None:
        super().__init__()
        self.compute = compute

    def __missing__(self, key: str) -> list[int]:
        value = self.compute(key)
        if len(self) >= CACHE_LIMIT:
            self.clear()
        self[key] = value
        return value


def merge_long(data: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Same ids as `bpe.merge`, in O(n log n): a heap of (rank, start) over a linked list of parts."""
    n = len(data)
    nxt = list(range(1, n + 1))  # part starting at i ends at nxt[i]
    prv = list(range(-1, n - 1))
    alive = [True] * n
    heap = []
    for i in range(n - 1):
        rank = ranks.get(data[i:i + 2])
        if rank is not None:
            heap.append((rank, i, i + 1, i + 2))
    heapq.heapify(heap)

    def push(i: int) -> None:
        j = nxt[i]
        if j < n:
            rank = ranks.get(data[i:nxt[j]])
            if rank is not None:
                heapq.heappush(heap, (rank, i, j, nxt[j]))

    while heap:
        _, i, j, k = heapq.heappop(heap)
        if not (alive[i] and alive[j] and nxt[i] == j and nxt[j] == k):
            continue
        alive[j] = False
        nxt[i] = k
        if k < n:
            prv[k] = i
        push(i)
        if prv[i] >= 0:
            push(prv[i])
    ids, i = [], 0
    while i < n:
        ids.append(ranks[data[i:nxt[i]]])
        i = nxt[i]
    return ids


class PairRanks:
    """Vectorized `ranks[bytes(a) + bytes(b)]` for arrays of token ids a, b (`none` where it is no token)."""

    def __init__(self, token_bytes: list[bytes], ranks: dict[bytes, int]) -> None:
        self.width = len(token_bytes) + 1
        self.none = self.width - 1  # above every id; also marks word ends in merge_batch, never in a key
        get, keys, ids = ranks.get, [], []
        for token_id, token in enumerate(token_bytes):
            for cut in range(1, len(token)):  # every split counts: tiktoken merges on bytes, not on ids
                left, right = get(token[:cut]), get(token[cut:])
                if left is not None and right is not None:
                    keys.append(left * self.width + right)
                    ids.append(token_id)
        order = np.argsort(np.array(keys, np.int64))
        self.keys = np.array(keys, np.int64)[order]
        self.ids = np.array(ids, np.int64)[order]

    def __call__(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Rank (id) of each pair's concatenated token, or `none`."""
        query = left * self.width + right
        at = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        return np.where(self.keys[at] == query, self.ids[at], self.none)


def merge_batch(words: list[bytes], pair_rank: PairRanks) -> list[list[int]]:
    """Ids of many words at once, same as `bpe.merge` on each: one merge per word per numpy step.

    All words lie in one flat array, each followed by a separator; `ranks[i]` is the rank of the pair
    starting at i. Each step takes every word's lowest (rank, position), merges it, deletes the right
    part and recomputes the two pairs around it; finished words are moved out.
    """
    none = sep = pair_rank.none
    if not words or not len(pair_rank.keys):  # nothing to merge, or no merges at all
        return [list(word) for word in words]
    sizes = np.fromiter(map(len, words), np.int64, len(words))
    flat = np.insert(np.frombuffer(b"".join(words), np.uint8).astype(np.int64), np.cumsum(sizes), sep)
    ranks = np.append(pair_rank(flat[:-1], flat[1:]), none)
    lengths, order, finished_parts = sizes + 1, np.arange(len(words)), []
    while len(order):
        starts, total = np.cumsum(lengths) - lengths, len(flat)
        rank, pos = np.divmod(np.minimum.reduceat(ranks * total + np.arange(total), starts), total)
        done = rank == none
        if done.any():
            drop = np.repeat(done, lengths)
            finished_parts.append((order[done], lengths[done], flat[drop]))
            order, lengths, flat, ranks = order[~done], lengths[~done], flat[~drop], ranks[~drop]
            rank, pos = rank[~done], pos[~done] - starts[~done] + np.cumsum(lengths) - lengths
        flat[pos] = rank
        flat, ranks = np.delete(flat, pos + 1), np.delete(ranks, pos + 1)
        lengths -= 1
        pos -= np.arange(len(pos))  # one part was deleted in each word before
        ranks[pos] = pair_rank(flat[pos], flat[pos + 1])
        ranks[pos - 1] = pair_rank(flat[pos - 1], flat[pos])  # at a word's start: (separator, x) -> none
    ids: list[list[int]] = [[] for _ in words]
    parts = np.concatenate([p[2] for p in finished_parts]).tolist()
    start = 0
    for index, length in zip(np.concatenate([p[0] for p in finished_parts]).tolist(),
                             np.concatenate([p[1] for p in finished_parts]).tolist()):
        ids[index] = parts[start:start + length - 1]
        start += length
    return ids


class CachedEncoder:
    """Ids of ordinary text (no special tokens) for one vocabulary and pattern, through the caches."""

    def __init__(self, token_bytes: list[bytes], pattern: str, merge_word: MergeWord) -> None:
        self.ranks = {token: rank for rank, token in enumerate(token_bytes)}
        self.merge_word = merge_word
        self.pair_rank = PairRanks(token_bytes, self.ranks)
        self.pattern, self.findall = pattern, make_splitter(pattern)
        self.space_cut = is_space_cuttable(pattern)
        self.words = _Memo(self.encode_word)
        for token, rank in self.ranks.items():  # single-token words never need merging
            with contextlib.suppress(UnicodeDecodeError):
                self.words[token.decode("utf-8")] = [rank]
        self.pieces: dict[str, list[int]] = {}

    def encode_word(self, word: str) -> list[int]:
        """Ids of one pre-tokenized word (cached by the caller)."""
        data = word.encode("utf-8")
        rank = self.ranks.get(data)
        if rank is not None:
            return [rank]
        if len(data) > LONG_WORD:
            return merge_long(data, self.ranks)
        return self.merge_word(data, self.ranks)

    def cache_words(self, words: set[str]) -> None:
        """Encode uncached words into the word cache, many short ones at once with `merge_batch`."""
        if len(self.words) + len(words) > CACHE_LIMIT:  # words needed later fall back to _Memo
            self.words.clear()
        if len(words) < BATCH_MIN:
            for word in words:
                self.words[word] = self.encode_word(word)
            return
        batch, batch_data = [], []
        for word in words:
            data = word.encode("utf-8")
            rank = self.ranks.get(data)
            if rank is not None:
                self.words[word] = [rank]
            elif len(data) > LONG_WORD:
                self.words[word] = merge_long(data, self.ranks)
            else:
                batch.append(word)
                batch_data.append(data)
        if batch:
            self.words.update(zip(batch, merge_batch(batch_data, self.pair_rank)))

    def encode_chunk(self, text: str) -> list[int]:
        """Ids of text that the pattern cuts on its own (no cached space-cut pieces).

        The pieces must tile the text (findall's matches do not overlap, so equal lengths and no empty
        piece mean they do): a pattern that skips a character would otherwise lose it silently.
        """
        words = self.findall(text)
        if sum(map(len, words)) != len(text) or not all(words):
            raise TokenizerError(f"pattern {self.pattern!r} does not cut {text[:40]!r}... into pieces that "
                                 "cover it (a character would be lost); refit the tokenizer with a pattern "
                                 "that matches every character")
        cached = self.words  # a set difference with a dict subclass would scan the whole cache
        self.cache_words({word for word in words if word not in cached})
        return list(chain.from_iterable(map(cached.__getitem__, words)))

    def cache_pieces(self, pieces: Iterable[str]) -> None:
        """Encode uncached middle space-cut pieces (few regex calls, see words_of_pieces); cache ids."""
        cached = self.words
        for group, words, one_each in words_of_pieces(self.findall, pieces):
            self.cache_words({word for word in words if word not in cached})
            if one_each:
                self.pieces.update(zip(group, map(cached.__getitem__, words)))
            else:
                self.pieces.update(zip(group, piece_values(group, words, cached.__getitem__)))

    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text: cached space-cut pieces in the middle, the regex on the two ends."""
        if not self.space_cut:
            return self.encode_chunk(text)
        parts = SPACE_CUT.split(text)
        ids = self.encode_chunk(parts[0])
        if len(parts) > 2:
            middle, start = parts[1:-1], len(ids)
            try:
                ids.extend(chain.from_iterable(map(self.pieces.__getitem__, middle)))
            except KeyError:  # cold pieces: encode them all at once, then take the fast path again
                del ids[start:]
                missing = set(middle)
                if len(self.pieces) + len(missing) > CACHE_LIMIT:  # empty it before choosing what to add
                    self.pieces.clear()
                self.cache_pieces(missing.difference(self.pieces) if self.pieces else missing)
                ids.extend(chain.from_iterable(map(self.pieces.__getitem__, middle)))
        if len(parts) > 1:
            ids.extend(self.encode_chunk(" " + parts[-1]))
        return ids

"""Byte-level BPE (GPT-2 style), lossless on every valid string, id-compatible with tiktoken.

Example (minbpe style)::

    >>> tok = BPETokenizer.train("aaabdaaabac", vocab_size=256 + 3 + 1, min_frequency=1)
    >>> tok.token_bytes[256:]          # learned tokens in merge order ("ab" beats "aa"+"a" on bytes)
    [b'aa', b'ab', b'aaab']
    >>> tok.encode("aaabdaaabac")                   # "aaab" "d" "aaab" "a" "c" -> 100 = 'd', 97 = 'a'
    [258, 100, 258, 97, 99]
    >>> tok.decode(tok.encode("héllo <|endoftext|>"))
    'héllo <|endoftext|>'

Text is first cut into words by a regex (`pattern`: "gpt2", "gpt4" or a custom regex); merges never
cross word boundaries. Within a word, encoding repeatedly merges the adjacent pair whose concatenated
bytes has the lowest rank (id), exactly as tiktoken does, so `tiktoken.Encoding(pat_str=tok.pattern,
mergeable_ranks=tok.mergeable_ranks(), ...)` gives the same ids. Strings with lone surrogates cannot
be UTF-8 encoded and raise TokenizerError.
"""

from __future__ import annotations

import contextlib
import heapq
import re
import warnings
from collections.abc import Callable, Iterable
from itertools import chain, repeat
from typing import Any

import numpy as np

from llm.errors import TokenizerError
from llm.tokenizers._bpe_train import count_words, learn_merges
from llm.tokenizers.base import (
    EOT,
    FORMAT_VERSION,
    AllowedSpecial,
    Tokenizer,
    check_special_tokens,
    check_vocab_size,
    doc_field,
    paused_gc,
    training_texts,
)
from llm.tokenizers.patterns import (
    NAMED_PATTERNS,
    SPACE_CUT,
    is_space_cuttable,
    make_splitter,
    resolve_pattern,
    words_of_pieces,
)

CACHE_LIMIT = 200_000  # cached words / pieces before a cache is emptied: ~50 MB each, per encode worker
_NO_RANK = 1 << 62
LONG_WORD = 256  # bytes; longer words are merged with a heap instead of rescanning (avoids O(n^2))
BATCH_MIN = 64  # uncached words; fewer are merged one by one (numpy's per-call cost outweighs its speed)


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


def _merge_short(chars: str, ranks: dict[str, int]) -> list[int]:
    """Ids of a word given as one char per byte: merge the lowest-ranked adjacent pair until none is a token.

    Ties go to the leftmost pair, as in tiktoken. `ranks` keys are token bytes decoded as latin-1.
    """
    get, no_rank = ranks.get, _NO_RANK
    parts = list(chars)
    pair_ranks = list(map(get, map(str.__add__, parts[:-1], parts[1:]), repeat(no_rank)))
    while True:
        best = min(pair_ranks)
        if best == no_rank:
            break
        at = pair_ranks.index(best)
        parts[at] += parts.pop(at + 1)
        del pair_ranks[at]
        if at:
            pair_ranks[at - 1] = get(parts[at - 1] + parts[at], no_rank)
        if at < len(pair_ranks):
            pair_ranks[at] = get(parts[at] + parts[at + 1], no_rank)
        elif not pair_ranks:
            break
    return list(map(ranks.__getitem__, parts))


def _merge_long(data: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Same result as `_merge_short`, in O(n log n): a heap of (rank, start) over a linked list of parts."""
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


class _PairRanks:
    """Vectorized `ranks[bytes(a) + bytes(b)]` for arrays of token ids a, b (`none` where it is no token)."""

    def __init__(self, token_bytes: list[bytes], ranks: dict[bytes, int]) -> None:
        self.width = len(token_bytes) + 1
        self.none = self.width - 1  # above every id; also marks word ends in _merge_batch, never in a key
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


def _merge_batch(words: list[bytes], pair_rank: _PairRanks) -> list[list[int]]:
    """Ids of many words at once, same as `_merge_short` on each: one merge per word per numpy step.

    All words lie in one flat array, each followed by a separator; `ranks[i]` is the rank of the pair
    starting at i. Each step takes every word's lowest (rank, position), merges it, deletes the right
    part and recomputes the two pairs around it; finished words are moved out.
    """
    none = sep = pair_rank.none
    if not len(pair_rank.keys):
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


class BPETokenizer(Tokenizer):
    """Byte-level BPE: ids 0-255 are bytes, then one id per learned merge, then the special tokens."""

    kind = "bpe"

    def __init__(self, merges: Iterable[tuple[int, int]], pattern: str = "gpt4",
                 special_tokens: Iterable[str] = (EOT,), *, source: str = "<merges>") -> None:
        self.pattern = resolve_pattern(pattern)
        self.pattern_name = next((name for name, rx in NAMED_PATTERNS.items() if rx == self.pattern), None)
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.token_bytes: list[bytes] = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            if not (0 <= a < len(self.token_bytes) and 0 <= b < len(self.token_bytes)):
                raise TokenizerError(f"{source}: merge ({a}, {b}) refers to a token not yet defined; "
                                     "the tokenizer is corrupt, refit it")
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        self._ranks = {b: i for i, b in enumerate(self.token_bytes)}
        self._char_ranks = {b.decode("latin-1"): i for b, i in self._ranks.items()}  # for _merge_short
        if len(self._ranks) != len(self.token_bytes):
            raise TokenizerError(f"{source}: two merges make the same token bytes; the tokenizer is corrupt, "
                                 "refit it")
        base = len(self.token_bytes)
        self._special = {s: base + i for i, s in enumerate(check_special_tokens(special_tokens))}
        self._id_bytes = self.token_bytes + [s.encode("utf-8") for s in self._special]
        self._findall = make_splitter(self.pattern)
        self._space_cut = is_space_cuttable(self.pattern)
        self._words = _Memo(self._encode_word)
        for token, rank in self._ranks.items():  # single-token words never need merging
            with contextlib.suppress(UnicodeDecodeError):
                self._words[token.decode("utf-8")] = [rank]
        self._pieces: dict[str, list[int]] = {}
        self._pair_rank = _PairRanks(self.token_bytes, self._ranks)

    # ---- training ---------------------------------------------------------------------------------
    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2,
              pattern: str = "gpt4", special_tokens: Iterable[str] = (EOT,), progress: bool = False,
              num_workers: int = 0) -> BPETokenizer:
        """Learn merges up to `vocab_size` ids (specials included), or until no pair has min_frequency.

        `text` is one string or an iterable of documents (merges never cross documents). Stopping
        early warns; `vocab_size` of the result is then the size actually reached.
        """
        specials = check_special_tokens(special_tokens)
        vocab_size = check_vocab_size(vocab_size, 256 + len(specials),
                                      f"256 byte tokens + {len(specials)} special tokens")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise TokenizerError(f"min_frequency = {min_frequency!r}: must be an integer >= 1")
        regex = resolve_pattern(pattern)
        num_merges = vocab_size - 256 - len(specials)
        with paused_gc():
            words = count_words(training_texts(text), regex, num_workers)
            merges = learn_merges(words, num_merges, min_frequency, progress)
        if len(merges) < num_merges:
            warnings.warn(f"BPE stopped at vocab_size {256 + len(merges) + len(specials)} < requested "
                          f"{vocab_size}: no pair left occurring >= min_frequency ({min_frequency}) times; "
                          "the tokenizer records the size reached", stacklevel=2)
        return cls(merges, pattern, specials)

    # ---- encoding ---------------------------------------------------------------------------------
    def _encode_word(self, word: str) -> list[int]:
        """Ids of one pre-tokenized word (cached by the caller)."""
        data = word.encode("utf-8")
        rank = self._ranks.get(data)
        if rank is not None:
            return [rank]
        if len(data) > LONG_WORD:
            return _merge_long(data, self._ranks)
        return _merge_short(data.decode("latin-1"), self._char_ranks)

    def _cache_words(self, words: set[str]) -> None:
        """Encode uncached words into the word cache, many short ones at once with `_merge_batch`."""
        if len(self._words) + len(words) > CACHE_LIMIT:  # words needed later fall back to _Memo
            self._words.clear()
        if len(words) < BATCH_MIN:
            for word in words:
                self._words[word] = self._encode_word(word)
            return
        batch, batch_data = [], []
        for word in words:
            data = word.encode("utf-8")
            rank = self._ranks.get(data)
            if rank is not None:
                self._words[word] = [rank]
            elif len(data) > LONG_WORD:
                self._words[word] = _merge_long(data, self._ranks)
            else:
                batch.append(word)
                batch_data.append(data)
        if batch:
            self._words.update(zip(batch, _merge_batch(batch_data, self._pair_rank)))

    def _encode_chunk(self, text: str) -> list[int]:
        """Ids of text that the pattern cuts on its own (no cached space-cut pieces)."""
        words = self._findall(text)
        self._cache_words(set(words).difference(self._words))
        return list(chain.from_iterable(map(self._words.__getitem__, words)))

    def _cache_pieces(self, pieces: Iterable[str]) -> None:
        """Encode uncached middle space-cut pieces (few regex calls, see words_of_pieces); cache ids."""
        word_ids = self._words
        for group, words, one_each in words_of_pieces(self._findall, pieces):
            self._cache_words(set(words).difference(word_ids))
            if one_each:
                self._pieces.update(zip(group, map(word_ids.__getitem__, words)))
                continue
            matches = iter(words)
            for piece in group:
                word = next(matches)
                left = len(piece) + 1 - len(word)
                ids = word_ids[word]
                if left:
                    ids = ids.copy()
                    while left:
                        word = next(matches)
                        left -= len(word)
                        ids += word_ids[word]
                self._pieces[piece] = ids

    def _encode_text(self, text: str) -> list[int]:
        """Ids of ordinary text: cached space-cut pieces in the middle, the regex on the two ends."""
        if not self._space_cut:
            return self._encode_chunk(text)
        parts = SPACE_CUT.split(text)
        ids = self._encode_chunk(parts[0])
        if len(parts) > 2:
            middle, start = parts[1:-1], len(ids)
            try:
                ids.extend(chain.from_iterable(map(self._pieces.__getitem__, middle)))
            except KeyError:  # cold pieces: encode them all at once, then take the fast path again
                del ids[start:]
                missing = set(middle)
                if len(self._pieces) + len(missing) > CACHE_LIMIT:  # empty it before choosing what to add
                    self._pieces.clear()
                self._cache_pieces(missing.difference(self._pieces) if self._pieces else missing)
                ids.extend(chain.from_iterable(map(self._pieces.__getitem__, middle)))
        if len(parts) > 1:
            ids.extend(self._encode_chunk(" " + parts[-1]))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text`, treating special-token strings as plain text."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode: expected str, got {type(text).__name__}")
        try:
            with paused_gc():
                return self._encode_text(text)
        except UnicodeEncodeError as exc:
            raise TokenizerError(f"encode: text has a lone surrogate {exc.object[exc.start]!r} (not valid "
                                 "Unicode, cannot be UTF-8 encoded); clean the text first") from None

    def encode(self, text: str, *, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Ids of `text`; special-token strings are plain text unless in `allowed_special` (or "all")."""
        allowed = self._resolve_allowed(allowed_special)
        if not allowed:
            return self.encode_ordinary(text)
        splitter = re.compile("(" + "|".join(map(re.escape, sorted(allowed, key=len, reverse=True))) + ")")
        ids: list[int] = []
        for i, part in enumerate(splitter.split(text)):
            if i % 2:
                ids.append(allowed[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of token ids (may end mid-character)."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= len(self._id_bytes)):
            bad = next(i for i in ids if not 0 <= i < len(self._id_bytes))
            raise TokenizerError(f"decode: id {bad} is out of range for vocab_size {len(self._id_bytes)}")
        return b"".join(map(self._id_bytes.__getitem__, ids))

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids; a cut multi-byte character decodes to U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- vocabulary and persistence --------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes + merges + special tokens."""
        return len(self._id_bytes)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token string -> id (ids follow the merged tokens)."""
        return dict(self._special)

    def mergeable_ranks(self) -> dict[bytes, int]:
        """Token bytes -> id for all non-special tokens, as `tiktoken.Encoding(mergeable_ranks=...)` takes."""
        return dict(self._ranks)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: the pattern regex, merges as id pairs, and the special tokens."""
        return {"type": self.kind, "version": FORMAT_VERSION, "vocab_size": self.vocab_size,
                "pattern_name": self.pattern_name, "pattern": self.pattern,
                "special_tokens": self._special, "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], source: str = "<dict>") -> BPETokenizer:
        """Rebuild from `to_dict()` output, checking every field."""
        pattern = doc_field(doc, "pattern", str, source)
        merges = doc_field(doc, "merges", list, source)
        specials = doc_field(doc, "special_tokens", dict, source)
        vocab_size = doc_field(doc, "vocab_size", int, source)
        if not all(isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m) for m in merges):
            raise TokenizerError(f"{source}: 'merges' must be a list of [id, id] pairs; the file is corrupt, "
                                 "re-run the fit_tokenizer stage")
        try:
            resolve_pattern(pattern)
            check_special_tokens(specials)
        except TokenizerError as exc:
            raise TokenizerError(f"{source}: {exc}; re-run the fit_tokenizer stage") from None
        tok = cls(merges, pattern, list(specials), source=source)
        if tok.special_tokens != specials or tok.vocab_size != vocab_size:
            raise TokenizerError(f"{source}: special token ids or vocab_size ({vocab_size}) do not match the "
                                 "merges; the file is corrupt, re-run the fit_tokenizer stage")
        return tok

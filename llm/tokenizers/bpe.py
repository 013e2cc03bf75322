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
bytes has the lowest rank (id): `merge` below is that loop, exactly as tiktoken runs it, so
`tiktoken.Encoding(pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks(), ...)` gives the same
ids. The encoder in `_bpe_encode.py` adds caches and faster engines for long and many words, with the
same result; training lives in `_bpe_train.py`. Strings with lone surrogates cannot be UTF-8 encoded
and raise TokenizerError.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from llm.errors import TokenizerError
from llm.tokenizers._bpe_encode import CachedEncoder
from llm.tokenizers._bpe_train import count_words, learn_merges
from llm.tokenizers.base import (
    EOT,
    Tokenizer,
    check_count,
    check_special_tokens,
    doc_field,
    paused_gc,
    training_texts,
)
from llm.tokenizers.patterns import NAMED_PATTERNS, resolve_pattern

if TYPE_CHECKING:
    from llm.config import TokenizerConfig

_NO_RANK = 1 << 62


def merge(word: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Ids of one pre-tokenized word: merge the adjacent pair of lowest rank until no pair is a token.

    Ties go to the leftmost pair, as in tiktoken. `ranks` maps token bytes to ids (256 single bytes,
    then one per learned merge, in merge order).

        >>> merge(b"aaab", {b"a": 97, b"b": 98, b"aa": 256, b"ab": 257, b"aaab": 258})
        [258]
    """
    parts = [word[i:i + 1] for i in range(len(word))]
    while len(parts) > 1:
        pair_ranks = [ranks.get(left + right, _NO_RANK) for left, right in zip(parts, parts[1:])]
        best = min(pair_ranks)
        if best == _NO_RANK:
            break
        at = pair_ranks.index(best)
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return [ranks[part] for part in parts]


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
        if len(set(self.token_bytes)) != len(self.token_bytes):
            raise TokenizerError(f"{source}: two merges make the same token bytes; the tokenizer is corrupt, "
                                 "refit it")
        base = len(self.token_bytes)
        self._special = {s: base + i for i, s in enumerate(check_special_tokens(special_tokens))}
        self._id_bytes = self.token_bytes + [s.encode("utf-8") for s in self._special]
        self._encoder = CachedEncoder(self.token_bytes, self.pattern, merge)

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
        vocab_size = check_count("vocab_size", vocab_size, 256 + len(specials),
                                 f"256 byte tokens + {len(specials)} special tokens")
        check_count("min_frequency", min_frequency, 1)
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

    @classmethod
    def fit(cls, text: str | Iterable[str], config: TokenizerConfig, *, progress: bool = False,
            num_workers: int = 0) -> BPETokenizer:
        """`train` with the `tokenizer` params section; a pattern that cannot be used names its key."""
        try:
            resolve_pattern(config.pattern)
        except TokenizerError as exc:
            raise TokenizerError(f"params.yaml: tokenizer.{exc}") from None
        return cls.train(text, config.vocab_size, min_frequency=config.min_frequency, pattern=config.pattern,
                         special_tokens=config.special_tokens, progress=progress, num_workers=num_workers)

    # ---- encoding ---------------------------------------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text`, treating special-token strings as plain text."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode: expected str, got {type(text).__name__}")
        try:
            with paused_gc():
                return self._encoder.encode(text)
        except UnicodeEncodeError as exc:
            raise TokenizerError(f"encode: text has a lone surrogate {exc.object[exc.start]!r} (not valid "
                                 "Unicode, cannot be UTF-8 encoded); clean the text first") from None

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

    def mergeable_ranks(self) -> dict[bytes, int]:
        """Token bytes -> id for all non-special tokens, as `tiktoken.Encoding(mergeable_ranks=...)` takes."""
        return {token: rank for rank, token in enumerate(self.token_bytes)}

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: the pattern regex, merges as id pairs, and the special tokens."""
        return self._document(pattern_name=self.pattern_name, pattern=self.pattern,
                              special_tokens=self._special, merges=[list(m) for m in self.merges])

    @classmethod
    def from_dict(cls, doc: dict[str, Any], source: str = "<dict>") -> BPETokenizer:
        """Rebuild from `to_dict()` output, checking every field."""
        pattern = doc_field(doc, "pattern", str, source)
        merges = doc_field(doc, "merges", list, source)
        specials = doc_field(doc, "special_tokens", dict, source)
        if not all(isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m) for m in merges):
            raise TokenizerError(f"{source}: 'merges' must be a list of [id, id] pairs; the file is corrupt, "
                                 "re-run the fit_tokenizer stage")
        try:
            resolve_pattern(pattern)
            check_special_tokens(specials)
        except TokenizerError as exc:
            raise TokenizerError(f"{source}: {exc}; re-run the fit_tokenizer stage") from None
        tok = cls(merges, pattern, list(specials), source=source)
        tok._check_rebuilt(doc, source, "merges")
        return tok

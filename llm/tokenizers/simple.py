r"""Word-level tokenizer: whitespace words (optionally punctuation split, optionally lowercased), and an
end-of-line token `<eol>` after every line, as in the word-level WikiText setup (its `<eos>`).

Example::

    >>> tok = SimpleTokenizer.train("the cat sat on the mat . the end", vocab_size=4 + 4)
    >>> tok.special_tokens
    {'<pad>': 0, '<unk>': 1, '<eol>': 2, '<|endoftext|>': 3}
    >>> tok.vocab[4:]                    # most frequent first, ties by word: "." < "cat" < "end"
    ['the', '.', 'cat', 'end']
    >>> tok.encode("the dog sat .\nthe end")  # unknown words -> <unk>; a newline -> <eol>
    [4, 1, 1, 5, 2, 4, 7]
    >>> tok.decode([4, 6, 2, 7, 3])      # words joined by single spaces, lines by newlines
    'the cat\nend <|endoftext|>'

So a text of W whitespace words on L newline-ended lines is W + L tokens (with `split_punctuation`
off): the count WikiText papers divide by, and the word count `word_ppl` uses. Within a line,
whitespace is normalised to single spaces (lossy); line breaks are kept.

Ids: 0 is `<pad>`, 1 is `<unk>`, 2 is `<eol>`, then the other special tokens, then the words by count
(desc) then word. Words occurring fewer than `min_frequency` times, or beyond `vocab_size`, become
`<unk>`. File versions: 2 has `<eol>`; 1 (before it) still loads, without it, its ids unchanged.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from llm.errors import TokenizerError
from llm.tokenizers.base import (
    EOT,
    Tokenizer,
    check_count,
    check_special_tokens,
    doc_field,
    training_texts,
)

if TYPE_CHECKING:
    from llm.config import TokenizerConfig

PAD, UNK, EOL = "<pad>", "<unk>", "<eol>"
_WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]")


def _specials(special_tokens: Iterable[str], end_of_line: bool) -> list[str]:
    """`<pad>`, `<unk>`, `<eol>` (if used), then the other special tokens, each once."""
    fixed = [PAD, UNK, EOL] if end_of_line else [PAD, UNK]
    return fixed + [s for s in check_special_tokens(special_tokens) if s not in fixed]


class SimpleTokenizer(Tokenizer):
    """Word-level vocabulary; `<unk>` for words outside it, `<eol>` at each line end. `decode` joins the
    words of a line with single spaces (lossy within a line)."""

    kind = "simple"
    version = 2

    def __init__(self, vocab: Iterable[str], special_tokens: Iterable[str] = (EOT,), *,
                 lowercase: bool = False, split_punctuation: bool = False, end_of_line: bool = True) -> None:
        """`end_of_line` False rebuilds a version-1 file: no `<eol>`, line breaks read as spaces."""
        specials = _specials(special_tokens, end_of_line)
        self.end_of_line = end_of_line
        self._special = {s: i for i, s in enumerate(specials)}
        self.vocab = specials + [w for w in vocab if w not in self._special]
        self._ids = {w: i for i, w in enumerate(self.vocab)}
        if len(self._ids) != len(self.vocab):
            raise TokenizerError("SimpleTokenizer: the vocabulary repeats a word; refit the tokenizer")
        self._word_ids = {w: i for w, i in self._ids.items() if w not in self._special}
        self.lowercase = lowercase
        self.split_punctuation = split_punctuation

    def words(self, text: str) -> list[str]:
        """The words of `text` as this tokenizer sees them (lowercased / punctuation split if set); line
        breaks are whitespace here."""
        if self.lowercase:
            text = text.lower()
        return _WORD_OR_PUNCT.findall(text) if self.split_punctuation else text.split()

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int = 10000, *, min_frequency: int = 1,
              lowercase: bool = False, split_punctuation: bool = False,
              special_tokens: Iterable[str] = (EOT,)) -> SimpleTokenizer:
        """Keep the `vocab_size` - specials most frequent words occurring >= `min_frequency` times."""
        specials = _specials(special_tokens, end_of_line=True)
        vocab_size = check_count("vocab_size", vocab_size, len(specials) + 1,
                                 f"{len(specials)} specials + 1 word")
        check_count("min_frequency", min_frequency, 1)
        splitter = cls([], specials, lowercase=lowercase, split_punctuation=split_punctuation)
        counts: Counter[str] = Counter()
        for item in training_texts(text):
            counts.update(splitter.words(item))
        for special in specials:
            counts.pop(special, None)
        ranked = sorted((w for w, c in counts.items() if c >= min_frequency), key=lambda w: (-counts[w], w))
        room = vocab_size - len(specials)
        if len(ranked) < room:
            warnings.warn(f"SimpleTokenizer: only {len(ranked)} words occur >= min_frequency "
                          f"({min_frequency}) times; vocab_size is {len(specials) + len(ranked)}, "
                          f"not {vocab_size}", stacklevel=2)
        return cls(ranked[:room], specials, lowercase=lowercase, split_punctuation=split_punctuation)

    @classmethod
    def fit(cls, text: str | Iterable[str], config: TokenizerConfig, *, progress: bool = False,
            num_workers: int = 0) -> SimpleTokenizer:
        """`train` with the `tokenizer` params section (one quick pass: no progress bar, no workers)."""
        return cls.train(text, config.vocab_size, min_frequency=config.min_frequency,
                         lowercase=config.lowercase, split_punctuation=config.split_punctuation,
                         special_tokens=config.special_tokens)

    def encode_ordinary(self, text: str) -> list[int]:
        """Word ids of `text`, `<unk>` for unknown words, `<eol>` for each newline ("\\n"); special-token
        strings are words like any other."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode: expected str, got {type(text).__name__}")
        get, unk = self._word_ids.get, self._special[UNK]
        if not self.end_of_line:
            return [get(word, unk) for word in self.words(text)]
        eol = self._special[EOL]
        ids: list[int] = []
        for number, line in enumerate(text.split("\n")):
            if number:
                ids.append(eol)
            ids.extend(get(word, unk) for word in self.words(line))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Words of `ids` joined by single spaces, a newline for each `<eol>` (the spacing within a line
        and the case are not restored)."""
        eol = self.eol_id
        lines, words = [], []
        for i in ids:
            if not 0 <= i < len(self.vocab):
                raise TokenizerError(f"decode: id {i} is out of range; ids must be in [0, {len(self.vocab)})")
            if i == eol:
                lines.append(" ".join(words))
                words = []
            else:
                words.append(self.vocab[i])
        lines.append(" ".join(words))
        return "\n".join(lines)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.vocab)

    @property
    def unk_id(self) -> int:
        """Id of `<unk>`."""
        return self._special[UNK]

    @property
    def eol_id(self) -> int | None:
        """Id of `<eol>` (None for a version-1 file, which had none)."""
        return self._special.get(EOL) if self.end_of_line else None

    @property
    def pad_id(self) -> int:
        """Id of `<pad>`."""
        return self._special[PAD]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: options, special tokens, and the words in id order (version 1, the layout
        without `<eol>`, for a tokenizer rebuilt from such a file)."""
        return self._document(version=None if self.end_of_line else 1, lowercase=self.lowercase,
                              split_punctuation=self.split_punctuation, special_tokens=self._special,
                              words=self.vocab[len(self._special):])

    @classmethod
    def from_dict(cls, doc: dict[str, Any], source: str = "<dict>") -> SimpleTokenizer:
        """Rebuild from `to_dict()` output, checking every field."""
        specials = doc_field(doc, "special_tokens", dict, source)
        words = doc_field(doc, "words", list, source)
        options = {k: doc_field(doc, k, bool, source) for k in ("lowercase", "split_punctuation")}
        if not all(isinstance(w, str) for w in words):
            raise TokenizerError(f"{source}: 'words' must be a list of strings; the file is corrupt, "
                                 "re-run the fit_tokenizer stage")
        try:
            tok = cls(words, list(specials), **options, end_of_line=doc["version"] >= 2)
        except TokenizerError as exc:
            raise TokenizerError(f"{source}: {exc}") from None
        tok._check_rebuilt(doc, source, "words")
        return tok

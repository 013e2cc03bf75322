"""Pre-tokenization regexes (GPT-2, GPT-4/cl100k) and a fast exact splitter for the named ones.

A byte-level BPE never merges across the pieces that its regex cuts the text into.
The named patterns are the ones tiktoken ships, so `tiktoken.Encoding(pat_str=...)`
with our ranks reproduces our ids exactly.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator

import regex

from llm.errors import TokenizerError

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
                r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
NAMED_PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# The same patterns for pure-ASCII text, where \p{L}, \p{N} and \s are A-Za-z, 0-9 and the six ASCII
# White_Space characters: Python's `re` runs them faster than `regex` runs the Unicode ones.
_WS = r"\t\n\x0b\x0c\r "
_ASCII_PATTERNS = {
    GPT2_PATTERN: (rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]++| ?[0-9]++| ?[^{_WS}A-Za-z0-9]++"""
                   rf"""|[{_WS}]++$|[{_WS}]+(?![^{_WS}])|[{_WS}]"""),
    GPT4_PATTERN: (rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]++|[0-9]{{1,3}}+"""
                   rf"""| ?[^{_WS}A-Za-z0-9]++[\r\n]*+|[{_WS}]++$|[{_WS}]*[\r\n]"""
                   rf"""|[{_WS}]+(?![^{_WS}])|[{_WS}]"""),
}

# For both named patterns every match ends right before a U+0020 space whose preceding character is not
# whitespace (letters, digits and punctuation runs all stop there, no alternative looks behind, and the
# piece after it ends in non-whitespace so `$` and `(?!\S)` see the same thing). Cutting the text at
# those spaces therefore gives exactly the same matches, and the cut pieces repeat a lot, so they can be
# cached. Python's \s is a superset of the Unicode White_Space the patterns use, so this errs on the
# side of cutting less.
SPACE_CUT = re.compile(r" (?<!\s )")


# One character of every Unicode general category, with the controls and line breaks real text holds: a
# custom pattern must cover each of them, alone and in a run, or the BPE would silently drop text.
PROBE_CHARACTERS = ("Aa\u01c5\u02b0\u65e5\u05d0\u0301\u0903\u20dd7\u0663\u216b\u00bd_-()\u00ab\u00bb!+$^"
                    "\U0001f389\u00a9 \u00a0\u3000\u2028\u2029\n\r\t\x00\x7f\u200b\ufeff\ue000\u0378"
                    "\U0001d518'")
PROBE_TEXTS = (*PROBE_CHARACTERS, PROBE_CHARACTERS, "h\u00e9llo w\u00f6rld \u65e5\u672c \U0001f389\n",
               "It's 2024:  tabs\tand\r\nCRLF  ")
LOSSLESS_FIX = "add a last alternative that takes any one character, e.g. `|[\\s\\S]`"


def _alternatives(pattern: str) -> list[str]:
    """The top-level alternatives of a regex (split on `|` outside groups, classes and escapes)."""
    parts, depth, start, i, in_class = [], 0, 0, 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 1
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            i += pattern.startswith("^", i + 1)
            i += pattern.startswith("]", i + 1)  # a `]` first in a class is a literal
        elif char in "()":
            depth += 1 if char == "(" else -1
        elif char == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    return parts + [pattern[start:]]


def _describe(char: str) -> str:
    return f"{char!r} (U+{ord(char):04X}, {unicodedata.category(char)})"


def check_lossless(pattern: str) -> None:
    """TokenizerError unless the pieces of `pattern` cover every text exactly, as far as a probe of every
    Unicode category can tell: it must have no capturing group (findall would return the groups), no
    alternative that can match the empty string, and a match for every character."""
    compiled = regex.compile(pattern)
    if compiled.groups:
        raise TokenizerError(f"pattern = {pattern!r}: has capturing groups, so its pieces would be the "
                             "groups, not the text; write each group as (?:...)")
    for alternative in _alternatives(pattern):
        try:
            part = regex.compile(alternative, compiled.flags)
        except regex.error:  # a construct the splitter does not know: the whole-pattern checks still run
            continue
        empty = (m for text in PROBE_TEXTS for m in part.finditer(text) if m.start() == m.end())
        if part.fullmatch("") or next(empty, None):
            raise TokenizerError(f"pattern = {pattern!r}: its alternative {alternative!r} can match the "
                                 "empty string, which cuts no text; make it match at least one character "
                                 "(e.g. + instead of *)")
    for text in PROBE_TEXTS:
        covered = 0
        for match in compiled.finditer(text):
            if match.start() != covered or match.start() == match.end():
                break
            covered = match.end()
        if covered < len(text):
            raise TokenizerError(f"pattern = {pattern!r}: skips {_describe(text[covered])}, so the BPE would "
                                 f"silently drop such characters; {LOSSLESS_FIX}")


def resolve_pattern(pattern: str) -> str:
    """The regex for a pattern name (`gpt2`, `gpt4`) or a custom regex string, checked to compile and to
    cut text into pieces that cover it (`check_lossless`)."""
    if not isinstance(pattern, str) or not pattern:
        raise TokenizerError(f"pattern = {pattern!r}: use 'gpt2', 'gpt4' or a non-empty regex string")
    if pattern in NAMED_PATTERNS:
        return NAMED_PATTERNS[pattern]
    if re.fullmatch(r"[a-z][a-z0-9_-]*", pattern):
        raise TokenizerError(f"pattern = {pattern!r}: unknown pattern name; use one of "
                             f"{', '.join(NAMED_PATTERNS)} or a regex string")
    try:
        regex.compile(pattern)
    except regex.error as exc:
        raise TokenizerError(f"pattern = {pattern!r}: not a valid regex ({exc}); fix it or use gpt2/gpt4"
                             ) from None
    check_lossless(pattern)
    return pattern


def make_splitter(pattern: str) -> Callable[[str], list[str]]:
    """A function text -> pre-tokenized pieces (strings), for a resolved pattern."""
    unicode_findall = regex.compile(pattern).findall
    try:
        ascii_findall = re.compile(_ASCII_PATTERNS[pattern]).findall
    except (KeyError, re.error):  # a custom pattern, or a Python whose `re` lacks possessive quantifiers
        return unicode_findall

    def findall(text: str) -> list[str]:
        return ascii_findall(text) if text.isascii() else unicode_findall(text)

    return findall


def is_space_cuttable(pattern: str) -> bool:
    """True when `SPACE_CUT` cuts never change this pattern's matches (the named patterns)."""
    return pattern in NAMED_PATTERNS.values()


def words_of_pieces(findall: Callable[[str], list[str]],
                    pieces: Iterable[str]) -> Iterator[tuple[list[str], list[str], bool]]:
    """(pieces, their words in order, one word each?) in groups, for middle pieces of `SPACE_CUT.split`.

    " " + an ASCII-letters piece is one word under both named patterns, so those need no regex. The
    other middle pieces end in non-whitespace, so one regex run over " " + " ".join(pieces) cuts the
    matches exactly where the pieces meet: piece k owns the next matches whose lengths add up to
    len(piece) + 1. ASCII pieces go together so that the fast ASCII regex runs on them.
    """
    letters, ascii_other, other = [], [], []
    for piece in pieces:
        if not piece.isascii():
            other.append(piece)
        elif piece.isalpha():
            letters.append(piece)
        else:
            ascii_other.append(piece)
    if letters:
        yield letters, [" " + piece for piece in letters], True
    for group in (ascii_other, other):
        if group:
            yield group, findall(" " + " ".join(group)), False


def piece_values(group: list[str], words: list[str], value: Callable[[str], list]) -> Iterator[list]:
    """For each piece of a `words_of_pieces` group, in order: the concatenated `value(word)` of its words.

    Piece k owns the next matches whose lengths add up to len(piece) + 1 (its leading space). With
    `value` = the word's token ids this gives the piece's ids; with `value` = [word], its words.
    """
    matches = iter(words)
    for piece in group:
        word = next(matches)
        left, values = len(piece) + 1 - len(word), value(word)
        if left:
            values = values.copy()
            while left:
                word = next(matches)
                left -= len(word)
                values += value(word)
        yield values

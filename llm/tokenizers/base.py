"""The tokenizer interface, its versioned JSON file format, and `load_tokenizer`.

Every tokenizer saves to one JSON document ``{"type": ..., "version": ..., ...}`` that
holds everything needed to rebuild it exactly; pickle is never used. Each type numbers its own
file versions (`Tokenizer.version`, the newest): a change of the layout bumps it, and files of
older versions still load.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from llm.config import SPECIAL_TOKENS_RULE, special_tokens_valid
from llm.errors import TokenizerError
from llm.io import write_json_atomic

if TYPE_CHECKING:
    from llm.config import TokenizerConfig

EOT = "<|endoftext|>"
AllowedSpecial = Literal["all"] | Collection[str]

TOKENIZER_TYPES: dict[str, type[Tokenizer]] = {}  # `type` of the file -> class; filled by subclassing


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses set `kind` (the file's `type`) and `_special` (special token -> id),
    and implement the abstract methods."""

    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1  # newest file version of this type; load_tokenizer reads 1..version
    _special: dict[str, int]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            TOKENIZER_TYPES[cls.kind] = cls

    @classmethod
    @abstractmethod
    def fit(cls, text: str | Iterable[str], config: TokenizerConfig, *, progress: bool = False,
            num_workers: int = 0) -> Tokenizer:
        """Train on `text` with the `tokenizer` params section (what the fit_tokenizer stage runs)."""

    @abstractmethod
    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, treating special-token strings as plain text."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token string -> id."""
        return dict(self._special)

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The JSON document that rebuilds this tokenizer (with `type` and `version`)."""

    @classmethod
    @abstractmethod
    def from_dict(cls, doc: dict[str, Any], source: str = "<dict>") -> Tokenizer:
        """Rebuild from `to_dict()` output; `source` names the file in error messages."""

    @property
    def eot_id(self) -> int | None:
        """Id of `<|endoftext|>`, or None when it is not a special token."""
        return self.special_tokens.get(EOT)

    @property
    def unk_id(self) -> int | None:
        """Id that stands for text outside the vocabulary; None for a lossless tokenizer (byte-level BPE)."""
        return None

    @property
    def eol_id(self) -> int | None:
        """Id that ends every line, when the tokenizer has one instead of encoding the newline as text."""
        return None

    def decode_after(self, context: list[int], ids: list[int]) -> str:
        """The text `ids` add after `context` (a prompt): decode(context + ids) less decode(context).

        So a continuation is printed as it reads after the prompt: with a word-level tokenizer it
        starts with the space between the prompt's last word and its first.
        """
        return self.decode(list(context) + list(ids))[len(self.decode(context)):]

    def encode(self, text: str, *, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Token ids of `text`; special tokens count only if listed in `allowed_special` (or "all")."""
        allowed = self._resolve_allowed(allowed_special)
        if not allowed or not isinstance(text, str):  # encode_ordinary rejects what is not a str
            return self.encode_ordinary(text)
        longest_first = sorted(allowed, key=len, reverse=True)
        ids: list[int] = []
        for i, part in enumerate(re.split("(" + "|".join(map(re.escape, longest_first)) + ")", text)):
            if i % 2:
                ids.append(allowed[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_batch(self, texts: Iterable[str], *, allowed_special: AllowedSpecial = ()) -> list[list[int]]:
        """`encode` of each text (the per-word cache is shared across the batch)."""
        return [self.encode(text, allowed_special=allowed_special) for text in texts]

    def _document(self, version: int | None = None, **state: Any) -> dict[str, Any]:
        """The file's JSON object: `type`, `version` (this type's newest unless given) and `vocab_size`,
        then this tokenizer's `state`."""
        return {"type": self.kind, "version": version or self.version, "vocab_size": self.vocab_size, **state}

    def _check_rebuilt(self, doc: dict[str, Any], source: str, built_from: str) -> None:
        """Refuse a rebuilt tokenizer whose special token ids or size differ from what its file says."""
        specials = doc_field(doc, "special_tokens", dict, source)
        vocab_size = doc_field(doc, "vocab_size", int, source)
        if self.special_tokens != specials or self.vocab_size != vocab_size:
            raise TokenizerError(f"{source}: special token ids or vocab_size ({vocab_size}) do not match the "
                                 f"{built_from}; the file is corrupt, re-run the fit_tokenizer stage")

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one JSON document, atomically."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer file written by `save` (it must be of this class's type)."""
        tok = load_tokenizer(path)
        if not isinstance(tok, cls):
            raise TokenizerError(f"{path}: holds a {tok.kind!r} tokenizer, not {cls.kind!r}; "
                                 f"use load_tokenizer() or refit with tokenizer_type: {cls.kind}")
        return tok

    def _resolve_allowed(self, allowed_special: AllowedSpecial) -> dict[str, int]:
        """The special tokens that `allowed_special` enables, checked against this vocabulary."""
        if allowed_special == "all":
            return self.special_tokens
        if isinstance(allowed_special, str):
            raise TokenizerError(f"allowed_special = {allowed_special!r}: pass 'all' or a set of strings")
        unknown = [s for s in allowed_special if s not in self.special_tokens]
        if unknown:
            raise TokenizerError(f"allowed_special: {unknown!r} are not special tokens of this tokenizer "
                                 f"(it has {list(self.special_tokens)})")
        return {s: self.special_tokens[s] for s in allowed_special}


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic GC, which would rescan every cached list again and again while we build millions."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def check_special_tokens(special_tokens: Iterable[str]) -> list[str]:
    """The special tokens as a list, or TokenizerError when any is empty, repeated or not a string."""
    tokens = list(special_tokens) if not isinstance(special_tokens, str) else [special_tokens]
    if not special_tokens_valid(tokens):
        raise TokenizerError(f"special_tokens = {tokens!r}: {SPECIAL_TOKENS_RULE}")
    return tokens


def check_count(name: str, value: Any, minimum: int, why: str = "") -> int:
    """`value` as an int >= minimum, else a TokenizerError naming the argument (and why the minimum)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        because = f" ({why})" if why else ""
        raise TokenizerError(f"{name} = {value!r}: must be an integer >= {minimum}{because}")
    return value


def training_texts(text: str | Iterable[str]) -> list[str]:
    """Normalise `text` (a string or an iterable of strings) to a list; empty text is an error."""
    texts = [text] if isinstance(text, str) else list(text)
    for item in texts:
        if not isinstance(item, str):
            raise TokenizerError(f"training text must be str or iterable of str, not {type(item).__name__}")
    if not any(texts):
        raise TokenizerError("training text is empty: give the tokenizer some text to learn from")
    return texts


def doc_field(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    """`doc[key]`, checked to exist and have the JSON type `kind`, else a TokenizerError naming `source`."""
    if key not in doc:
        raise TokenizerError(f"{source}: tokenizer file lacks the field {key!r}; it is corrupt, "
                             "re-run the fit_tokenizer stage")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise TokenizerError(f"{source}: field {key!r} has the wrong type ({type(value).__name__}); "
                             "the file is corrupt, re-run the fit_tokenizer stage")
    return value


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read any tokenizer file written by `Tokenizer.save`, dispatching on its `type`."""
    path = Path(path)
    redo = "re-run the fit_tokenizer stage (dvc repro fit_tokenizer)"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer file not found; {redo}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read the tokenizer file ({exc}); {redo}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc}); the file is corrupt, {redo}") from None
    if not isinstance(doc, dict):
        raise TokenizerError(f"{path}: expected a JSON object with 'type' and 'version'; {redo}")
    kind = doc_field(doc, "type", str, str(path))
    version = doc_field(doc, "version", int, str(path))
    if kind not in TOKENIZER_TYPES:
        known = ", ".join(sorted(TOKENIZER_TYPES))
        raise TokenizerError(f"{path}: unknown tokenizer type {kind!r} (known: {known}); {redo}")
    newest = TOKENIZER_TYPES[kind].version
    if version > newest:
        raise TokenizerError(f"{path}: {kind} tokenizer file version {version} is newer than this code reads "
                             f"({newest}); upgrade the llm package or {redo}")
    if version < 1:
        raise TokenizerError(f"{path}: tokenizer file version {version} is not valid; {redo}")
    return TOKENIZER_TYPES[kind].from_dict(doc, source=str(path))

"""Tokenizers built from scratch: byte-level BPE (GPT-2 style) and word-level.

    >>> from llm.tokenizers import BPETokenizer, load_tokenizer      # doctest: +SKIP
    >>> tok = BPETokenizer.train(text, vocab_size=4096)              # doctest: +SKIP
    >>> tok.save("data/tokenizer.json"); load_tokenizer("data/tokenizer.json")  # doctest: +SKIP

Every subclass of `Tokenizer` registers itself in `TOKENIZER_TYPES` under its `kind`, the `type` of
its file and the `tokenizer.tokenizer_type` of params.yaml.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from llm.errors import TokenizerError
from llm.tokenizers.base import EOT, TOKENIZER_TYPES, Tokenizer, load_tokenizer
from llm.tokenizers.bpe import BPETokenizer
from llm.tokenizers.simple import SimpleTokenizer

__all__ = ["EOT", "BPETokenizer", "SimpleTokenizer", "Tokenizer", "TOKENIZER_TYPES", "load_tokenizer",
           "train_tokenizer"]


def train_tokenizer(tokenizer_type: str, text: str | Iterable[str], vocab_size: int,
                    **options: Any) -> Tokenizer:
    """Train a tokenizer of `tokenizer_type` ("bpe" or "simple"); `options` go to its `train`."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerError(f"tokenizer_type = {tokenizer_type!r}: unknown; use one of "
                             f"{', '.join(TOKENIZER_TYPES)}")
    return TOKENIZER_TYPES[tokenizer_type].train(text, vocab_size, **options)

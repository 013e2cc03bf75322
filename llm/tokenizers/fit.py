"""Fit a tokenizer from the `tokenizer` params section (what the fit_tokenizer stage runs)."""

from __future__ import annotations

import os
from pathlib import Path

from llm.config import TokenizerConfig
from llm.errors import DataError
from llm.io import utf8_error
from llm.tokenizers import TOKENIZER_TYPES
from llm.tokenizers.base import Tokenizer


def read_training_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of `path`; a missing, unreadable, empty or non-UTF-8 file is a DataError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the download stage first (dvc repro download)") from None
    except UnicodeDecodeError as exc:
        raise utf8_error(str(path), exc) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not text.strip():
        raise DataError(f"{path}: is empty; the tokenizer needs training text (check the download stage)")
    return text


def fit_tokenizer(text: str, config: TokenizerConfig, *, progress: bool = False,
                  num_workers: int = 0) -> Tokenizer:
    """Train the tokenizer that `config` describes on `text`."""
    tokenizer_class = TOKENIZER_TYPES[config.tokenizer_type]
    return tokenizer_class.fit(text, config, progress=progress, num_workers=num_workers)

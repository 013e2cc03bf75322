"""Corpus preparation for the download stage: fetch or collect text, write data/raw/{train,valid,test}.txt.

Example::

    >>> stats = prepare_raw(load_params().data, Path("data/raw"))      # doctest: +SKIP
    >>> print(stats["train"].summary("train"))                          # doctest: +SKIP
    train: 36,718 lines, 2,051,910 words, 10,918,892 bytes
"""

from __future__ import annotations

from pathlib import Path

from llm.config import DataConfig
from llm.data.download import RetryPolicy
from llm.data.sources import open_plan
from llm.data.splits import write_plan
from llm.data.text import SplitStats
from llm.io import atomic_dir

__all__ = ["SplitStats", "prepare_raw"]


def prepare_raw(config: DataConfig, out_dir: Path = Path("data/raw"), *, cache_dir: Path | None = None,
                policy: RetryPolicy | None = None, progress: bool = True) -> dict[str, SplitStats]:
    """Write the three splits into `out_dir` all at once: after any failure `out_dir` is left untouched."""
    with atomic_dir(out_dir) as staging, \
            open_plan(config, cache_dir=cache_dir, policy=policy, progress=progress) as plan:
        return write_plan(plan, staging, config.val_fraction, config.test_fraction, progress,
                          max_bytes=config.max_bytes)

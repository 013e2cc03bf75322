"""Corpus preparation for the download stage: fetch or collect text, write data/raw/{train,valid,test}.txt.

Example::

    >>> stats = prepare_raw(load_params().data, Path("data/raw"))      # doctest: +SKIP
    >>> print(stats["train"].summary("train"))                          # doctest: +SKIP
    train: 36,718 lines, 2,051,910 words, 10,918,892 bytes
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from llm.config import DataConfig
from llm.data.download import RetryPolicy
from llm.data.sources import open_plan
from llm.data.splits import write_plan
from llm.data.text import SplitStats

__all__ = ["SplitStats", "prepare_raw"]


def prepare_raw(config: DataConfig, out_dir: Path = Path("data/raw"), *, cache_dir: Path | None = None,
                policy: RetryPolicy | None = None, progress: bool = True) -> dict[str, SplitStats]:
    """Write the three splits into `out_dir` all at once: after any failure `out_dir` is left untouched."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; data/raw is an ordinary shared folder
    try:
        with open_plan(config, cache_dir=cache_dir, policy=policy, progress=progress) as plan:
            stats = write_plan(plan, staging, config.val_fraction, config.test_fraction, progress)
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stats


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the finished `staging` folder with renames (never a half-filled out_dir)."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".old-{out_dir.name}-", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)

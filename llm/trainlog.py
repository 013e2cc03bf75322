"""Training curves (metrics/train_log.tsv, metrics/val_log.tsv) that survive a resume exactly.

The rows live in the training checkpoint, so a resumed run restores the rows up
to its step and appends: its files equal an uninterrupted run's (tokens/s aside,
which is a wall-clock measurement).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm.errors import DataError
from llm.io import write_text_atomic

TRAIN_COLUMNS = ("step", "train_loss", "lr", "tokens_per_sec")
VAL_COLUMNS = ("step", "val_loss", "val_bpb")
TRAIN_LOG = "train_log.tsv"
VAL_LOG = "val_log.tsv"


def _cell(value: float | int) -> str:
    """A TSV cell: integers as is, floats with enough digits to compare runs."""
    return str(value) if isinstance(value, int) else format(value, ".8g")


def format_tsv(columns: tuple[str, ...], rows: list[list[float | int]]) -> str:
    """Header plus one tab-separated line per row."""
    lines = ["\t".join(columns)] + ["\t".join(_cell(v) for v in row) for row in rows]
    return "\n".join(lines) + "\n"


def parse_tsv(text: str, source: str, needed: tuple[str, ...] = ()) -> list[dict[str, float]]:
    """Rows of a TSV written by format_tsv (`text`, read from `source`), as dicts of floats; DataError if it
    lacks a `needed` column or is not numeric (a row cut short included)."""
    header, *lines = text.splitlines() or [""]
    columns = header.split("\t")
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{source}: no column {', '.join(missing)} (header: {columns}); "
                        "re-run the train stage")
    try:
        return [dict(zip(columns, map(float, line.split("\t")), strict=True)) for line in lines if line]
    except ValueError as exc:
        raise DataError(f"{source}: not a numeric log ({exc}); re-run the train stage") from None


def read_tsv(path: str | os.PathLike, needed: tuple[str, ...] = ()) -> list[dict[str, float]]:
    """`parse_tsv` of a file; DataError if it is missing."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: training log not found; run the train stage first (dvc repro train)"
                        ) from None
    return parse_tsv(text, str(path), needed)


@dataclass
class TrainLog:
    """Logged rows plus the running mean of the train loss since the last row."""

    train_rows: list[list[float | int]] = field(default_factory=list)
    val_rows: list[list[float | int]] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_steps: int = 0

    def add_loss(self, loss: float) -> None:
        """Count one optimizer step's loss towards the next row."""
        self.loss_sum += loss
        self.loss_steps += 1

    def add_train_row(self, step: int, lr: float, tokens_per_sec: float) -> float:
        """Append a train row (mean loss since the previous row) and return that mean."""
        mean_loss = self.loss_sum / max(self.loss_steps, 1)
        self.train_rows.append([step, mean_loss, lr, tokens_per_sec])
        self.loss_sum, self.loss_steps = 0.0, 0
        return mean_loss

    def add_val_row(self, step: int, val_loss: float, val_bpb: float) -> None:
        """Append one evaluation."""
        self.val_rows.append([step, val_loss, val_bpb])

    def state(self) -> dict[str, Any]:
        """Plain lists and numbers, storable in a weights_only checkpoint."""
        return {"train_rows": self.train_rows, "val_rows": self.val_rows,
                "loss_sum": self.loss_sum, "loss_steps": self.loss_steps}

    @classmethod
    def from_state(cls, state: dict[str, Any], step: int) -> TrainLog:
        """Restore a log, keeping only rows at or before `step`."""
        return cls(train_rows=[list(r) for r in state.get("train_rows", []) if r[0] <= step],
                   val_rows=[list(r) for r in state.get("val_rows", []) if r[0] <= step],
                   loss_sum=float(state.get("loss_sum", 0.0)), loss_steps=int(state.get("loss_steps", 0)))

    def write(self, metrics_dir: str | os.PathLike) -> None:
        """Write both TSV files atomically."""
        metrics_dir = Path(metrics_dir)
        write_text_atomic(metrics_dir / TRAIN_LOG, format_tsv(TRAIN_COLUMNS, self.train_rows))
        write_text_atomic(metrics_dir / VAL_LOG, format_tsv(VAL_COLUMNS, self.val_rows))

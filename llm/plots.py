"""Matplotlib figures of the training logs (Agg canvas, no display or global pyplot state needed): one
run's loss and learning rate (the evaluate stage's plots/loss.png), and the loss curves of several runs
overlaid (`llm compare`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llm.errors import ConfigError, DataError
from llm.io import atomic_path
from llm.trainlog import read_tsv

X_LABELS = {"step": "step", "tokens": "tokens seen (batch_size x max_seq_length a step)",
            "time": "training time (s, from the logged tokens/s)"}


def log_frame(rows: list[dict[str, float]], columns: tuple[str, ...]) -> pd.DataFrame:
    """Rows parsed by llm.trainlog (the one log reader: unlike pandas' read_csv, it refuses a row cut short
    by a killed run instead of padding it with NaN) as a DataFrame of the named columns."""
    return pd.DataFrame(rows, columns=list(columns))


def read_log(path: str | os.PathLike, columns: tuple[str, ...]) -> pd.DataFrame:
    """The named columns of a training log file (metrics/*_log.tsv)."""
    return log_frame(read_tsv(path, columns), columns)


def run_title(payload: dict[str, Any], tokenizer_type: str) -> str:
    """A title naming the run's key settings: tokenizer, width, depth, heads, learning rate."""
    config = payload.get("model_config", {})
    params = payload.get("params") or {}
    train = params.get("train", params) if isinstance(params, dict) else {}
    lr = train.get("learning_rate", "?") if isinstance(train, dict) else "?"
    return (f"{tokenizer_type} tokenizer, vocab {config.get('vocab_size', '?')} | d_model "
            f"{config.get('d_model', '?')}, {config.get('num_layers', '?')} layers, "
            f"{config.get('num_heads', '?')} heads | lr {lr}")


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, out_path: str | os.PathLike) -> None:
    """Write the figure atomically, in the format its suffix names (.png, .svg, .pdf, ...; none: PNG)."""
    kind = Path(out_path).suffix.lstrip(".").lower() or "png"
    if kind not in figure.canvas.get_supported_filetypes():
        raise ConfigError(f"{out_path}: matplotlib cannot write .{kind} files; use .png, .svg or .pdf")
    with atomic_path(out_path) as tmp:
        figure.savefig(tmp, format=kind, dpi=120)


def plot_loss(train_log: str | os.PathLike, val_log: str | os.PathLike, out_path: str | os.PathLike,
              title: str) -> None:
    """Train and validation loss against step, learning rate on a second axis; written atomically."""
    train = read_log(train_log, ("step", "train_loss", "lr"))
    if train.empty:
        raise DataError(f"{train_log}: no rows; run the train stage first (`dvc repro train`)")
    val = read_log(val_log, ("step", "val_loss"))
    figure = _new_figure(9, 5)
    loss_axis = figure.add_subplot()
    loss_axis.plot(train["step"], train["train_loss"], label="train loss", color="tab:blue", linewidth=1)
    loss_axis.plot(val["step"], val["val_loss"], label="validation loss", color="tab:orange", marker="o",
                   markersize=3)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss (nats/token)")
    loss_axis.grid(alpha=0.3)
    lr_axis = loss_axis.twinx()
    lr_axis.plot(train["step"], train["lr"], label="learning rate", color="tab:green", alpha=0.5)
    lr_axis.set_ylabel("learning rate")
    lines = loss_axis.get_lines() + lr_axis.get_lines()
    loss_axis.legend(lines, [line.get_label() for line in lines], loc="upper right")
    figure.suptitle(title, fontsize=10)
    save_figure(figure, out_path)


@dataclass
class Curves:
    """One run's curves for `plot_runs`: `train` has the x column and train_loss, `val` x and val_loss."""

    label: str
    train: pd.DataFrame
    val: pd.DataFrame


def plot_runs(runs: list[Curves], x: str, out_path: str | os.PathLike, note: str = "") -> Figure:
    """Train loss (left) and validation loss (right) of every run against `x` (a key of X_LABELS), one
    colour a run, on one loss scale; written atomically, and returned so callers can inspect it."""
    figure = _new_figure(12, 5.5)
    train_axis, val_axis = figure.subplots(1, 2, sharex=True, sharey=True)
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        train_axis.plot(run.train[x], run.train["train_loss"], color=color, linewidth=1, label=run.label)
        val_axis.plot(run.val[x], run.val["val_loss"], color=color, marker="o", markersize=3, label=run.label)
    for axis, title in ((train_axis, "train loss"), (val_axis, "validation loss")):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(X_LABELS[x])
        axis.grid(alpha=0.3)
    train_axis.set_ylabel("loss (nats/token)")
    figure.legend(*train_axis.get_legend_handles_labels(), loc="outside lower center",
                  ncols=min(len(runs), 2), fontsize=9)
    figure.suptitle("Train and validation loss" + (f"\n{note}" if note else ""), fontsize=11)
    save_figure(figure, out_path)
    return figure

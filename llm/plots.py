"""Matplotlib figures of the training logs (Agg canvas, no display or global pyplot state needed)."""

from __future__ import annotations

import os
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llm.errors import DataError
from llm.io import atomic_path
from llm.trainlog import read_tsv


def read_log(path: str | os.PathLike, columns: tuple[str, ...]) -> dict[str, list[float]]:
    """The named columns of a training log (metrics/*_log.tsv), each as a list."""
    rows = read_tsv(path, columns)
    return {c: [row[c] for row in rows] for c in columns}


def run_title(payload: dict[str, Any], tokenizer_type: str) -> str:
    """A title naming the run's key settings: tokenizer, width, depth, heads, learning rate."""
    config = payload.get("model_config", {})
    params = payload.get("params") or {}
    train = params.get("train", params) if isinstance(params, dict) else {}
    lr = train.get("learning_rate", "?") if isinstance(train, dict) else "?"
    return (f"{tokenizer_type} tokenizer, vocab {config.get('vocab_size', '?')} | d_model "
            f"{config.get('d_model', '?')}, {config.get('num_layers', '?')} layers, "
            f"{config.get('num_heads', '?')} heads | lr {lr}")


def plot_loss(train_log: str | os.PathLike, val_log: str | os.PathLike, out_path: str | os.PathLike,
              title: str) -> None:
    """Train and validation loss against step, learning rate on a second axis; written atomically."""
    train = read_log(train_log, ("step", "train_loss", "lr"))
    if not train["step"]:
        raise DataError(f"{train_log}: no rows; run the train stage first (`dvc repro train`)")
    val = read_log(val_log, ("step", "val_loss"))
    figure = Figure(figsize=(9, 5), layout="constrained")
    FigureCanvasAgg(figure)
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
    with atomic_path(out_path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)

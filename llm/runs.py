"""Compare runs: the table of `llm runs` and the overlaid loss curves of `llm compare`.

Both read DVC's records of the runs through its Python API: `dvc.api.exp_show()` gives one flat dict a
run (the workspace, the commit it is based on, each experiment) holding its params (`model.d_model`),
its metrics (`valid_bpb`) and the hashes of its dependencies (`data/shards`, dropped here), and
`dvc.api.read(path, rev=...)` a file as that run left it. Metrics and training logs are `cache: false`
outputs committed to git with every experiment, so a clone compares runs with no DVC cache pulled.
Numbers come back as floats (`512.0`), booleans and lists as strings (`'True'`, `"['valid']"`), a value
DVC could not read (a run without metrics) as `'!'`.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from llm.config import SECTIONS
from llm.errors import ConfigError, DataError
from llm.trainlog import TRAIN_LOG, VAL_LOG, parse_tsv

if TYPE_CHECKING:  # matplotlib is imported by `llm compare` alone: `llm runs` starts faster without it
    from matplotlib.figure import Figure

    from llm.plots import Curves

KEY_METRICS = ("valid_bpb", "valid_word_ppl", "test_bpb", "train_time_s", "num_params", "steps")
DEFAULT_SORT = "valid_bpb"
WORKSPACE = "workspace"
# Columns of dvc.api.exp_show() that describe the row, not the run's params or metrics.
_ROW_INFO = ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor")
_LOGS = {TRAIN_LOG: ("step", "train_loss", "tokens_per_sec"), VAL_LOG: ("step", "val_loss")}


def load_runs() -> pd.DataFrame:
    """Every run DVC knows from HEAD, indexed by name (`workspace`, the baseline's branch or commit, the
    experiments' names): columns `rev` and `state`, then metrics, then params; DataError outside a DVC
    project or when no run has metrics yet."""
    import dvc.api
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import NoSCMError

    try:
        root = Repo.find_root()
        rows = dvc.api.exp_show(repo=root)  # without a root found, exp_show would take "." for a URL
    except NotDvcRepoError:
        raise DataError(f"{Path.cwd()}: not inside a DVC project (no .dvc folder here or above); run this "
                        "in the project folder") from None
    except NoSCMError:
        raise DataError("this DVC project has no git repository: DVC records experiments as git commits "
                        "(`git init && git add -A && git commit`, then `dvc exp run`)") from None
    except DvcException as exc:
        raise DataError(f"DVC could not list the experiments: {exc}") from None
    if not rows:
        raise DataError("no runs yet: experiments branch from a git commit (`git add -A && git commit`), "
                        "then `dvc repro` or `dvc exp run` trains one")
    table = pd.DataFrame(rows)
    table = table.mask(table.eq("!")).infer_objects()  # "!": DVC could not read it (a run without metrics)
    table.index = pd.Index(table["Experiment"].fillna(table["rev"]), name="run")
    params = param_columns(table)
    # The rest are metrics, and the dependencies' hashes, named by their paths (data/shards).
    metrics = [c for c in table.columns if c not in _ROW_INFO and c not in params and "/" not in c]
    if table[metrics].isna().all(axis=None):
        raise DataError("no run has metrics yet: train one first (`dvc repro`, or `dvc exp run` for an "
                        "experiment)")
    table = table[["rev", "State", *metrics, *params]].rename(columns={"State": "state"}).apply(_integers)
    table.attrs["root"] = root
    return table


def _integers(column: pd.Series) -> pd.Series:
    """A float column whose values are all whole numbers as integers (DVC returns 512 as 512.0)."""
    values = column.dropna()
    if column.dtype.kind == "f" and len(values) and (values % 1 == 0).all():
        return column.astype("Int64")
    return column


def param_columns(table: pd.DataFrame) -> list[str]:
    """The params (`section.key`) columns of a runs table."""
    return [c for c in table.columns if c.split(".")[0] in SECTIONS]


def differing_params(table: pd.DataFrame) -> list[str]:
    """Params whose value is not the same in every row (a missing value counts as a value)."""
    return [c for c in param_columns(table) if _exact_text(table[c]).nunique() > 1]


def _repeats_a_run(table: pd.DataFrame) -> bool:
    """Whether the workspace has the params and metrics of another row (after `dvc exp run` it holds the
    last experiment's results)."""
    values = table.drop(columns=["rev", "state"]).apply(_exact_text)
    return bool((values.drop(index=WORKSPACE) == values.loc[WORKSPACE]).all(axis=1).any())


def runs_table(table: pd.DataFrame, *, every_param: bool = False, sort: str = DEFAULT_SORT) -> pd.DataFrame:
    """The rows of `table` sorted by `sort` (ascending, missing last) with the columns worth reading (the
    workspace only when it is not a repeat of another row): `state` where a run is not finished, the
    key metrics, `<split>_unk_rate` where a run has `<unk>` tokens (its bpb is then not comparable with
    a lossless tokenizer's), then the params that differ between runs (every param with `every_param`)."""
    if WORKSPACE in table.index and _repeats_a_run(table):
        table = table.drop(index=WORKSPACE)
    metrics = [m for m in KEY_METRICS if m in table.columns]
    metrics += [c for c in table.columns if c.endswith("_unk_rate") and (table[c].fillna(0) > 0).any()]
    unfinished = table["state"].notna() & (table["state"] != "Success")
    columns = (["state"] if unfinished.any() else []) + metrics
    columns += param_columns(table) if every_param else differing_params(table)
    if sort not in table.columns:
        if sort != DEFAULT_SORT:
            keys = [c for c in table.columns if c not in ("rev", "state")]
            close = difflib.get_close_matches(sort, keys, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            metric_names = [c for c in keys if c not in param_columns(table)]
            raise ConfigError(f"--sort {sort}: no such metric or param; {hint}the metrics are "
                              f"{', '.join(metric_names)}; params are section.key (`llm runs --all`)")
        return table[columns]
    return table.sort_values(sort, na_position="last", kind="stable")[columns]


def _missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _exact_text(column: pd.Series) -> pd.Series:
    """Each value as full-precision text, `-` when missing: equal texts are equal values."""
    return column.map(lambda value: "-" if _missing(value) else repr(value))


def format_value(value: object, measured: bool = False) -> str:
    """A table cell: `-` when missing, integers as such, floats to 5 significant digits (a `measured`
    value keeps its trailing zeros, so a column of metrics lines up: 2.3900 above 2.5832)."""
    if _missing(value):
        return "-"
    whole = isinstance(value, float) and value.is_integer() and not measured
    if isinstance(value, (int, np.integer)) or whole:
        return f"{int(value):,}" if abs(value) >= 10_000 else str(int(value))
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:{'#' if measured else ''}.5g}"
    return str(value)


def render(table: pd.DataFrame, kind: str = "text") -> str:
    """The table as aligned text, GitHub markdown or CSV (CSV keeps full precision)."""
    if kind == "csv":
        return table.to_csv()
    params = param_columns(table)
    cells = table.apply(lambda column: column.map(lambda v: format_value(v, column.name not in params)))
    header = [table.index.name or "run", *cells.columns]
    rows = [[str(name), *row] for name, row in zip(cells.index, cells.itertuples(index=False))]
    if kind == "markdown":
        lines = [header, ["---"] + ["---:"] * len(cells.columns)] + [[c.replace("|", "\\|") for c in row]
                                                                   for row in rows]
        return "".join("| " + " | ".join(line) + " |\n" for line in lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "".join("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])
                   + "\n" for row in [header, *rows])


def _read_logs(table: pd.DataFrame, name: str) -> dict[str, str]:
    """The training logs' text as run `name` left them: the files on disk for the workspace, else from
    git at the run's revision (through DVC, which resolves experiment names)."""
    import dvc.api
    from dvc.exceptions import DvcException

    logs = {}
    for log in _LOGS:
        path = f"metrics/{log}"
        in_project = Path(table.attrs["root"], path)
        try:
            if name == WORKSPACE:
                logs[log] = in_project.read_text(encoding="utf-8")
            else:  # dvc.api.read takes paths relative to the current folder
                logs[log] = dvc.api.read(os.path.relpath(in_project), rev=str(table.at[name, "rev"]))
        except (OSError, DvcException) as exc:
            raise DataError(f"{name}: cannot read {path} ({type(exc).__name__}: {exc}); was it trained "
                            "with this project's train stage?") from None
    return logs


def _curves(table: pd.DataFrame, name: str, logs: dict[str, str], x: str, label: str) -> Curves:
    """One run's train and validation curves with the x column `x` (step, tokens or time) added."""
    from llm.plots import Curves, log_frame

    train, val = (log_frame(parse_tsv(logs[log], f"{name}: metrics/{log}", columns), columns)
                  for log, columns in _LOGS.items())
    if x != "step":
        sizes = [table.at[name, key] if key in table.columns else pd.NA
                 for key in ("train.batch_size", "model.max_seq_length")]
        if any(pd.isna(size) for size in sizes):
            raise DataError(f"{name}: its params lack train.batch_size or model.max_seq_length, so its "
                            "tokens per step are unknown; use --x step")
        tokens_per_step = float(sizes[0] * sizes[1])
        train["tokens"], val["tokens"] = train["step"] * tokens_per_step, val["step"] * tokens_per_step
        # Each train row holds the tokens/s since the previous row: its interval took steps x tokens / rate.
        intervals = train["step"].diff().fillna(train["step"]) * tokens_per_step / train["tokens_per_sec"]
        train["time"] = intervals.cumsum()
        val["time"] = np.interp(val["step"], train["step"], train["time"])
    return Curves(label, train, val)


def _label(table: pd.DataFrame, name: str, params: list[str]) -> str:
    """`name: key=value, ...` for the params that differ between the plotted runs (short keys when unique)."""
    short = [p.split(".", 1)[1] for p in params]
    keys = short if len(set(short)) == len(short) else params
    settings = ", ".join(f"{k}={format_value(table.at[name, p])}" for k, p in zip(keys, params))
    return f"{name}: {settings}" if settings else name


def compare(names: list[str], out_path: str | os.PathLike, x: str = "step") -> Figure:
    """Overlay the loss curves of the named runs (names from `llm runs`, or revisions) and the workspace in
    one figure written to `out_path`; returns the figure.

    The workspace joins when `llm runs` lists it, that is when it is not a repeat of another run (after
    `dvc exp run` it holds the last experiment's results) and has training logs.
    """
    from llm.plots import plot_runs

    table = load_runs()
    by_rev = {str(rev): name for name, rev in table["rev"].items()}
    chosen = []
    for name in names:
        if name not in table.index and name not in by_rev:
            raise ConfigError(f"{name}: no such run; the runs are {', '.join(table.index)} (see `llm runs`)")
        chosen.append(name if name in table.index else by_rev[name])
    chosen = list(dict.fromkeys(chosen))
    logs = {name: _read_logs(table, name) for name in chosen}
    if WORKSPACE not in logs and WORKSPACE in table.index and not _repeats_a_run(table):
        with contextlib.suppress(DataError):  # not trained yet: nothing to draw
            logs[WORKSPACE] = _read_logs(table, WORKSPACE)
            chosen.append(WORKSPACE)
    plotted = table.loc[chosen]
    params = differing_params(plotted)
    curves = [_curves(plotted, name, logs[name], x, _label(plotted, name, params)) for name in chosen]
    changed_text = [p for p in params if p.split(".")[0] in ("data", "tokenizer")]
    note = (f"{', '.join(changed_text)} differ: loss per token is not comparable across them; compare "
            "valid_bpb (`llm runs`)" if changed_text else "")
    return plot_runs(curves, x, out_path, note)

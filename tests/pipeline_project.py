"""Tiny projects in temp folders: the one tiny params.yaml of the tests, and a copy of this project
driven with real git and DVC.

Params: `write_params` writes every key, from the dataclass defaults in llm/config.py (never this
checkout's params.yaml, which is the user's to edit), shrunk by TINY_PARAMS so a whole pipeline
runs in seconds on a CPU, then the test's own changes.

Used by the end-to-end tests (test_pipeline.py, test_faults.py, ...): the copy holds the library, the
stage scripts and dvc.yaml of this checkout, the tiny params.yaml, a fresh `dvc init` and one git commit.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from llm.config import DERIVED_KEYS, SECTIONS, Params, params_from_dict, section_dict

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("llm", "stages", "dvc.yaml", "pyproject.toml", ".gitignore", ".dvcignore")
DVC_FILES = ("config", "plots.html")  # the project's DVC settings and the offline plots page they name
STAGES = ("download", "fit_tokenizer", "encode", "train", "evaluate", "samples")

# A model of a few tens of thousands of parameters, a 300-token BPE and eight steps: every stage
# runs, on the real tiny-Shakespeare text, in seconds.
TINY_PARAMS: dict[str, dict[str, Any]] = {
    "tokenizer": {"vocab_size": 300},
    "model": {"d_model": 32, "num_heads": 2, "num_layers": 2, "d_ff": 64, "max_seq_length": 16,
              "dropout": 0.1},
    "train": {"batch_size": 8, "learning_rate": 0.003, "min_lr": 0.0003, "warmup_steps": 4, "max_epochs": 1,
              "max_steps": 8, "eval_interval": 4, "eval_batches": 2, "checkpoint_interval": 4},
    "eval": {"batch_size": 64},
    "generate": {"max_length": 20, "num_samples": 2},
    "runtime": {"device": "cpu", "precision": "fp32", "progress": False, "num_workers": 1, "log_interval": 2},
}


def subprocess_env(project: Path) -> dict[str, str]:
    """Environment for git/DVC/stage subprocesses in `project`: this venv's python first on PATH.

    DVC's per-repo index goes inside the project (by default it lands in a machine-wide
    folder), analytics are off, and torch uses one thread: for models this small, more
    threads only add synchronisation, which on a busy machine makes each step ten times slower.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(project / ".dvc" / "tmp" / "site_cache"),
               PYTHONUNBUFFERED="1", GIT_TERMINAL_PROMPT="0")
    return env


def run(project: Path, *cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command in `project`; stdout and stderr together in `.stdout`; fail loudly if asked."""
    done = subprocess.run(cmd, cwd=project, env=subprocess_env(project), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}")
    return done


def dvc(project: Path, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `dvc ARGS` (this venv's DVC) in `project`."""
    return run(project, sys.executable, "-m", "dvc", *args, check=check, timeout=timeout)


def git(project: Path, *args: str) -> str:
    """Run `git ARGS` in `project` and return its output."""
    return run(project, "git", *args).stdout


def commit_all(project: Path, message: str) -> None:
    """Commit everything git does not ignore (params, dvc.lock, metrics) in the project copy."""
    git(project, "add", "-A")
    git(project, "commit", "-q", "--allow-empty", "-m", message)


def stages_ran(output: str) -> list[str]:
    """Stages DVC actually executed, in order, from the output of `dvc repro` / `dvc exp run`."""
    return re.findall(r"Running stage '([^']+)'", output)


def stages_skipped(output: str) -> list[str]:
    """Stages DVC found unchanged and skipped, from the output of `dvc repro`."""
    return re.findall(r"Stage '([^']+)' didn't change, skipping", output)


def assert_renders_offline(page: Path) -> None:
    """A DVC plots page that loads no script from the network, and whose local scripts exist."""
    html = page.read_text(encoding="utf-8")
    sources = re.findall(r"<script[^>]*\ssrc\s*=\s*[\"']([^\"']+)", html)
    assert not [s for s in sources if re.match(r"(https?:)?//", s)], f"{page} loads scripts from the network"
    assert all((page.parent / s).is_file() for s in sources), f"{page}: missing scripts {sources}"
    assert "vegaEmbed(" in html and "vega-embed" in html, f"{page}: no inlined Vega-Embed"
    assert "train_loss" in html and "val_loss" in html


def merge(base: dict, overrides: dict) -> dict:
    """A deep copy of `base` with the nested mapping `overrides` applied on top."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def default_params() -> dict[str, dict[str, Any]]:
    """Every params.yaml key at its default (llm/config.py), as nested dicts."""
    params = {name: section_dict(cls()) for name, cls in SECTIONS.items()}
    for section, key in DERIVED_KEYS:
        params[section].pop(key)
    return params


def tiny_params(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The defaults, then TINY_PARAMS, then `sections` ({key: value} per section name)."""
    return merge(merge(default_params(), TINY_PARAMS), sections)


def write_params(project: Path, **sections: dict[str, Any]) -> Params:
    """Write the project's params.yaml (tiny_params(**sections)); returns it validated."""
    raw = tiny_params(**sections)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return params_from_dict(raw)


def read_params(project: Path) -> dict:
    """The project's params.yaml as nested dicts."""
    return yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))


def edit_params(project: Path, **sections: dict[str, Any]) -> None:
    """Change keys of the project's params.yaml in place, keeping its comments and layout, as a user or
    `dvc exp run -S` does (unchanged values are left as written)."""
    path, round_trip = project / "params.yaml", YAML()
    params = round_trip.load(path)
    for section, values in sections.items():
        for key, value in values.items():
            if params[section].get(key) != value:
                params[section][key] = value
    round_trip.dump(params, path)


def build_project(dest: Path, text_files_dir: Path, overrides: dict | None = None) -> Path:
    """Create the tiny project in `dest` (a git repo with DVC initialised) and return it.

    Its params are tiny_params with `data` reading the *.txt files of `text_files_dir`, then
    `overrides` ({section: {key: value}}).
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, dest / name)
    data = {"dataset": "text_files", "text_files_dir": str(text_files_dir)}
    write_params(dest, **merge({"data": data}, overrides or {}))
    git(dest, "init", "-q")
    git(dest, "config", "user.email", "tests@example.com")
    git(dest, "config", "user.name", "tests")
    dvc(dest, "init", "-q")
    for name in DVC_FILES:
        shutil.copy2(ROOT / ".dvc" / name, dest / ".dvc" / name)
    shutil.copy2(ROOT / ".dvcignore", dest / ".dvcignore")  # replaces the empty one dvc init writes
    commit_all(dest, "tiny project")
    return dest

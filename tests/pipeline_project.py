"""Build a tiny copy of this project in a temp folder and drive it with real git and DVC.

Used by the end-to-end tests (test_pipeline.py, test_faults.py): the copy holds the
library, the stage scripts and dvc.yaml of this checkout, a params.yaml shrunk so the
whole pipeline runs in seconds on a CPU, a fresh `dvc init` and one git commit.
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

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("llm", "stages", "dvc.yaml", "pyproject.toml", ".gitignore", ".dvcignore")
STAGES = ("download", "fit_tokenizer", "encode", "train", "evaluate", "samples")

# A model of a few thousand parameters, a 300-token BPE and a few dozen steps: every
# stage runs, on the real tiny-Shakespeare text, in seconds.
TINY_PARAMS: dict[str, dict[str, Any]] = {
    "tokenizer": {"vocab_size": 300},
    "model": {"d_model": 16, "num_heads": 2, "num_layers": 1, "d_ff": 32, "max_seq_length": 32,
              "dropout": 0.1},
    "train": {"batch_size": 8, "max_steps": 30, "warmup_steps": 5, "eval_interval": 10,
              "eval_batches": 4, "checkpoint_interval": 10},
    "eval": {"batch_size": 64},
    "generate": {"max_length": 20, "num_samples": 2},
    "runtime": {"device": "cpu", "progress": False, "num_workers": 1, "log_interval": 5},
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


def merge(base: dict, overrides: dict) -> dict:
    """A deep copy of `base` with the nested mapping `overrides` applied on top."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_params(project: Path) -> dict:
    """The project's params.yaml as nested dicts."""
    return yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))


def write_params(project: Path, params: dict) -> None:
    """Replace the project's params.yaml with `params`."""
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def set_param(project: Path, dotted: str, value: Any) -> None:
    """Set `section.key` in the project's params.yaml, as a user editing the file would."""
    section, key = dotted.split(".")
    write_params(project, merge(read_params(project), {section: {key: value}}))


def build_project(dest: Path, text_files_dir: Path, overrides: dict | None = None) -> Path:
    """Create the tiny project in `dest` (a git repo with DVC initialised) and return it.

    Its params are TINY_PARAMS, then `data` reading the *.txt files of `text_files_dir`,
    then `overrides` ({section: {key: value}}).
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, dest / name)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")), TINY_PARAMS)
    data = {"dataset": "text_files", "text_files_dir": str(text_files_dir)}
    write_params(dest, merge(merge(params, {"data": data}), overrides or {}))
    git(dest, "init", "-q")
    git(dest, "config", "user.email", "tests@example.com")
    git(dest, "config", "user.name", "tests")
    dvc(dest, "init", "-q")
    shutil.copy2(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    commit_all(dest, "tiny project")
    return dest

"""`llm runs` and `llm compare` on real DVC experiments of one tiny project (built once for the module):
a learning-rate experiment and a word-level one, in the project and in a clone that has git alone."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pipeline_project import TINY_PARAMS, build_project, dvc, git, run, subprocess_env

import llm.runs
from llm.cli import main

pytestmark = pytest.mark.slow

LLM = str(Path(sys.executable).parent / "llm")  # the console script, as a user runs it
BASE_LR = TINY_PARAMS["train"]["learning_rate"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, shakespeare: Path) -> Path:
    """The tiny project with two experiments run from its first commit: `fast` (learning rate 0.01) and
    `words` (the word-level tokenizer); its baseline commit was never reproduced (no metrics)."""
    project = build_project(tmp_path_factory.mktemp("runs") / "project", shakespeare.parent)
    outputs = [dvc(project, "exp", "run", "-n", "fast", "-S", "train.learning_rate=0.01").stdout,
               dvc(project, "exp", "run", "-n", "words", "-S", f"train.learning_rate={BASE_LR}",
                   "-S", "tokenizer.tokenizer_type=simple").stdout]
    (project.parent / "exp-run-output.txt").write_text("\n".join(outputs), encoding="utf-8")
    return project


def baseline(project: Path) -> str:
    """The name `llm runs` gives the commit the experiments branch from: its branch."""
    return git(project, "branch", "--show-current").strip()


def llm_cli(where: Path, *args: str) -> subprocess.CompletedProcess:
    """`llm ARGS` in `where` as a user runs it (the console script), stdout and stderr apart."""
    return subprocess.run([LLM, *args], cwd=where, env=subprocess_env(where), capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def llm_here(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """`llm ARGS` in a folder, run in this process (no interpreter start-up and imports, a second each):
    (exit status, stdout, stderr)."""
    def call(where: Path, *args: str) -> tuple[int, str, str]:
        monkeypatch.chdir(where)
        for key, value in subprocess_env(where).items():
            monkeypatch.setenv(key, value)
        status = main(list(args))
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    return call


def runs_csv(llm_here, where: Path, *args: str) -> pd.DataFrame:
    status, out, err = llm_here(where, "runs", "--csv", *args)
    assert status == 0, err
    return pd.read_csv(io.StringIO(out), index_col="run")


def test_runs_lists_both_experiments_with_the_params_that_differ(project: Path, llm_here) -> None:
    table = runs_csv(llm_here, project)
    assert list(table.index[:2]) == sorted(["fast", "words"], key=lambda name: table.at[name, "valid_bpb"])
    params = ["train.learning_rate", "tokenizer.tokenizer_type"]
    assert table.index[-1] == baseline(project)  # never reproduced: no metrics, so last
    assert table.loc[baseline(project)].drop(params).isna().all()
    assert "workspace" not in table.index  # it holds the last experiment's results: not a run of its own
    assert list(table.columns) == ["valid_bpb", "valid_word_ppl", "test_bpb", "train_time_s", "num_params",
                                   "steps", "valid_unk_rate", "test_unk_rate", "tokenizer.tokenizer_type",
                                   "train.learning_rate"]
    assert table.loc[["fast", "words"], "train.learning_rate"].tolist() == [0.01, BASE_LR]
    assert table.loc[["fast", "words"], "tokenizer.tokenizer_type"].tolist() == ["bpe", "simple"]
    assert table.at["fast", "valid_unk_rate"] == 0 < table.at["words", "valid_unk_rate"] < 1
    assert (table.loc[["fast", "words"], "steps"] == TINY_PARAMS["train"]["max_steps"]).all()

    text = llm_cli(project, "runs").stdout.splitlines()
    assert text[0].split()[:3] == ["run", "valid_bpb", "valid_word_ppl"] and len(text) == 4
    assert [line.split()[0] for line in text[1:]] == list(table.index)
    markdown = llm_here(project, "runs", "--markdown", "--all")[1].splitlines()
    assert markdown[1].startswith("| --- | ---: |") and "| model.d_model |" in markdown[0]
    assert len(markdown) == 2 + 3


def test_runs_sorts_by_any_metric_or_param_and_names_a_wrong_key(project: Path, llm_here) -> None:
    by_rate = runs_csv(llm_here, project, "--sort", "train.learning_rate")
    assert by_rate["train.learning_rate"].is_monotonic_increasing
    status, out, err = llm_here(project, "runs", "--sort", "valid_bp")
    assert status == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: --sort valid_bp: no such metric or param; did you mean valid_bpb")


def test_word_level_evaluation_says_its_bpb_is_not_comparable(project: Path) -> None:
    output = (project.parent / "exp-run-output.txt").read_text(encoding="utf-8")
    assert re.search(r"note: [\d.]+% of the valid tokens are <unk>: valid_bpb and valid_word_ppl", output)
    assert output.count("are <unk>") == 2  # valid and test of the word-level run; none for BPE
    # Its samples read as text: a space (or a line break) between the prompt and the continuation.
    samples = (project / "reports" / "samples.txt").read_text(encoding="utf-8")
    continuations = re.findall(r"^Once upon a time(.)", samples, flags=re.MULTILINE | re.DOTALL)
    assert len(continuations) == 2 and set(continuations) <= {" ", "\n"}, samples


@pytest.mark.parametrize("x", ["step", "tokens", "time"])
def test_compare_overlays_the_curves_of_each_run(project: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, x: str) -> None:
    monkeypatch.chdir(project)
    for key, value in subprocess_env(project).items():
        monkeypatch.setenv(key, value)
    figure = llm.runs.compare(["fast", "words"], tmp_path / "cmp.png", x=x)
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_axis, val_axis = figure.axes
    assert len(train_axis.get_lines()) == len(val_axis.get_lines()) == 2  # the workspace repeats `words`
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == ["fast: tokenizer_type=bpe, learning_rate=0.01",
                      f"words: tokenizer_type=simple, learning_rate={BASE_LR}"]
    assert "tokenizer.tokenizer_type differ: loss per token is not comparable" in figure.get_suptitle()
    fast_train = train_axis.get_lines()[0].get_xdata()
    steps = TINY_PARAMS["train"]["max_steps"]
    if x == "step":
        assert list(fast_train) == list(range(2, steps + 1, 2))  # a row every runtime.log_interval steps
    elif x == "tokens":
        per_step = TINY_PARAMS["train"]["batch_size"] * TINY_PARAMS["model"]["max_seq_length"]
        assert list(fast_train) == [step * per_step for step in range(2, steps + 1, 2)]
    else:
        assert (pd.Series(fast_train).diff().dropna() > 0).all()


def test_compare_from_the_command_line_and_its_errors(project: Path, tmp_path: Path, llm_here) -> None:
    done = llm_cli(project / "stages", "compare", "fast", "words", "-o", str(tmp_path / "cmp.svg"))
    assert done.returncode == 0, done.stderr  # from a subfolder of the project too
    assert done.stdout == f"{tmp_path / 'cmp.svg'}: train and validation loss of fast, words against step\n"
    assert (tmp_path / "cmp.svg").read_text(encoding="utf-8").count("<svg") == 1
    status, _, err = llm_here(project, "compare", "fast", "words", baseline(project), "-o", "cmp.png")
    assert status == 2 and err.startswith(f"error: {baseline(project)}: cannot read metrics/train_log.tsv")
    status, _, err = llm_here(project, "compare", "fast", "nope")
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"error: nope: no such run; the runs are workspace, {baseline(project)},")
    status, _, err = llm_here(tmp_path, "runs")
    assert status == 2 and "not inside a DVC project" in err and err.count("\n") == 1
    assert not (project / "cmp.png").exists()


def test_a_clone_with_git_alone_compares_the_runs(project: Path, tmp_path: Path, llm_here) -> None:
    """Metrics and training logs are committed with each experiment: no DVC cache is needed."""
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(project), str(clone))
    git(clone, "fetch", "-q", "origin", "refs/exps/*:refs/exps/*")  # what `dvc exp pull` fetches from git
    assert not (clone / ".dvc" / "cache").exists() and not (clone / "models" / "model.pt").exists()
    assert set(runs_csv(llm_here, clone).index) == {"fast", "words", baseline(project)}
    done = llm_cli(clone, "compare", "fast", "words", "-o", "cmp.png")
    assert done.returncode == 0 and (clone / "cmp.png").is_file(), done.stderr

"""End to end: the six stages under real DVC, caching, re-runs by params section, experiments.

One tiny project is built per module and the checks run in order on it, each
leaving the project in the state the next one expects (the first repro is the
expensive part; later steps re-run only what they change).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from pipeline_project import (
    STAGES,
    TINY_PARAMS,
    assert_renders_offline,
    build_project,
    commit_all,
    dvc,
    edit_params,
    git,
    run,
    stages_ran,
    stages_skipped,
)

pytestmark = pytest.mark.slow

TRAIN_KEYS = {"train_loss", "val_loss", "val_ppl", "val_bpb", "tokens_per_sec", "num_params", "train_time_s",
              "device"}
EVAL_KEYS = {f"{split}_{metric}" for split in ("valid", "test")
             for metric in ("loss", "ppl", "bpb", "word_ppl")}
OUTS = ("data/raw/train.txt", "data/raw/valid.txt", "data/raw/test.txt", "data/tokenizer.json",
        "data/shards/meta.json", "models/model.pt", "metrics/train.json", "metrics/train_log.tsv",
        "metrics/val_log.tsv", "metrics/eval.json", "plots/loss.png", "reports/samples.txt")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, shakespeare: Path) -> Path:
    """The tiny project on tiny Shakespeare, shared by every check of this module."""
    return build_project(tmp_path_factory.mktemp("pipeline") / "project", shakespeare.parent)


@pytest.fixture(scope="module")
def first_repro(project: Path) -> str:
    """The output of the first `dvc repro` (the expensive step, run once)."""
    return dvc(project, "repro").stdout


def read_json(path: Path) -> dict:
    """A JSON file's content."""
    return json.loads(path.read_text(encoding="utf-8"))


def test_repro_runs_every_stage_and_writes_every_out(project: Path, first_repro: str) -> None:
    assert stages_ran(first_repro) == list(STAGES)
    missing = [out for out in OUTS if not (project / out).is_file()]
    assert not missing, f"declared outputs missing after dvc repro: {missing}"
    assert list((project / "data/shards/train").glob("*.npy")), "no train shards written"
    assert (project / "reports/samples.txt").read_text(encoding="utf-8").strip()


def test_metrics_have_the_documented_keys(project: Path, first_repro: str) -> None:
    train = read_json(project / "metrics/train.json")
    evaluation = read_json(project / "metrics/eval.json")
    assert set(train) >= TRAIN_KEYS, f"metrics/train.json lacks {TRAIN_KEYS - set(train)}"
    assert set(evaluation) >= EVAL_KEYS, f"metrics/eval.json lacks {EVAL_KEYS - set(evaluation)}"
    assert train["device"] == "cpu"
    assert 1000 < train["num_params"] < 50_000
    for key in EVAL_KEYS | (TRAIN_KEYS - {"device"}):
        value = evaluation.get(key, train.get(key))
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{key} = {value!r}"
    # Perplexity is exp(loss); a 300-token vocabulary bounds the loss of a sane model near ln(300).
    assert evaluation["valid_ppl"] == pytest.approx(math.exp(evaluation["valid_loss"]), rel=1e-4)
    assert evaluation["valid_loss"] < math.log(300) + 0.5


def test_generate_continues_a_prompt_from_a_training_checkpoint(project: Path, first_repro: str) -> None:
    generate = (sys.executable, "-m", "llm.cli", "generate", "--prompt", "ROMEO:", "--max-length", "8",
                "--num-samples", "1", "--checkpoint", "checkpoints/best_model.pt")
    output = run(project, *generate).stdout
    assert output.startswith("ROMEO:") and len(output.strip()) > len("ROMEO:"), output


def assert_nothing_ran(output: str) -> None:
    """`dvc repro` output in which every stage was found unchanged (not merely unparsed)."""
    assert stages_ran(output) == [] and stages_skipped(output) == list(STAGES), output


def test_second_repro_runs_nothing(project: Path, first_repro: str) -> None:
    assert_nothing_ran(dvc(project, "repro").stdout)
    assert "up to date" in dvc(project, "status").stdout
    commit_all(project, "first run")


def test_python_bytecode_beside_the_modules_changes_no_stage(project: Path, first_repro: str) -> None:
    """Running a stage without PYTHONDONTWRITEBYTECODE leaves __pycache__ in llm/ folders that stages
    depend on; git ignores them, so DVC must too, or a clone or a queued experiment re-runs stages."""
    for folder in ("llm/data", "llm/tokenizers"):
        cache = project / folder / "__pycache__"
        cache.mkdir(exist_ok=True)
        (cache / "sources.cpython-311.pyc").write_bytes(b"bytecode")
    assert "up to date" in dvc(project, "status").stdout


def test_runtime_knob_reruns_nothing(project: Path, first_repro: str) -> None:
    edit_params(project, runtime={"log_interval": 3})
    assert_nothing_ran(dvc(project, "repro").stdout)
    git(project, "checkout", "--", "params.yaml")


def test_forced_train_of_a_finished_run_trains_to_the_same_bytes(project: Path, first_repro: str) -> None:
    before = (project / "models/model.pt").read_bytes()
    output = dvc(project, "repro", "--force", "--single-item", "train").stdout
    assert stages_ran(output) == ["train"], output
    assert "not resuming from checkpoints/last.pt: its run is finished (step 8/8)" in output
    assert "step 8/8 |" in output  # it trained
    assert (project / "models/model.pt").read_bytes() == before  # same params and seed: same file, same hash


def run_experiment(project: Path, name: str, setting: str) -> list[str]:
    """`dvc exp run -n NAME -S SETTING` (which edits params.yaml and reproduces); the stages it ran."""
    output = dvc(project, "exp", "run", "-n", name, "-S", setting).stdout
    assert f"Ran experiment(s): {name}" in output, output
    return stages_ran(output)


def test_learning_rate_reruns_train_and_what_reads_the_model(project: Path, first_repro: str) -> None:
    assert run_experiment(project, "lr-high", "train.learning_rate=0.01") == ["train", "evaluate", "samples"]


def test_metrics_diff_shows_the_change(project: Path, first_repro: str) -> None:
    diff = json.loads(dvc(project, "metrics", "diff", "--json").stdout)
    changed = {key for metrics in diff.values() for key, values in metrics.items() if values.get("diff")}
    assert {"train_loss", "valid_loss", "test_bpb"} <= changed, diff


def test_plots_show_writes_html_that_renders_offline(project: Path, first_repro: str, tmp_path: Path) -> None:
    dvc(project, "plots", "show", "-o", str(tmp_path / "plots"))
    assert_renders_offline(tmp_path / "plots" / "index.html")
    drawn = json.loads(dvc(project, "plots", "show", "--json").stdout)["data"]
    assert sorted(drawn) == ["learning_rate", "loss", "plots/loss.png", "throughput"]  # each curve once


def test_vocab_size_reruns_everything_after_download(project: Path, first_repro: str) -> None:
    git(project, "checkout", "--", "params.yaml")  # back to the committed baseline
    ran = run_experiment(project, "vocab-320", "tokenizer.vocab_size=320")
    assert ran == ["fit_tokenizer", "encode", "train", "evaluate", "samples"]
    assert read_json(project / "data/tokenizer.json")["vocab_size"] == 320


def test_experiments_are_listed_with_params_and_metrics(project: Path, first_repro: str) -> None:
    rows = experiment_rows(json.loads(dvc(project, "exp", "show", "--json").stdout))
    assert {"lr-high", "vocab-320"} <= set(rows), f"experiments listed: {sorted(rows)}"
    baseline_rate = TINY_PARAMS["train"]["learning_rate"]  # the project's own params, not the defaults
    for name, rate, vocab in (("lr-high", 0.01, 300), ("vocab-320", baseline_rate, 320)):
        params = rows[name]["params"]["params.yaml"]["data"]
        assert (params["train"]["learning_rate"], params["tokenizer"]["vocab_size"]) == (rate, vocab)
    metrics = {name: rows[name]["metrics"]["metrics/eval.json"]["data"] for name in ("lr-high", "vocab-320")}
    assert all(set(values) >= EVAL_KEYS for values in metrics.values()), metrics
    assert metrics["lr-high"]["valid_bpb"] != metrics["vocab-320"]["valid_bpb"]


def experiment_rows(show: list[dict]) -> dict[str, dict]:
    """`dvc exp show --json` flattened to {experiment name: its data (params, metrics)}."""
    rows = {}
    for baseline in show:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs", []):
                if rev.get("name"):
                    rows[rev["name"]] = rev["data"]
    return rows

"""Where a run starts: exact resume after SIGKILL or a signal; never a finished run or a changed one."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_project import write_params
from train_project import (
    assert_same_weights,
    crash_in_forward,
    make_project,
    model_state,
    outputs,
    run_train_stage,
    stage_command,
    stage_env,
)

import llm.train
from llm.checkpoint import read_checkpoint
from llm.fingerprint import code_hashes
from llm.train import train
from llm.trainlog import read_tsv

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
# Dropout > 0 so the restored RNG state matters; accumulation so micro-steps are resumed whole.
EXACT = {"model": {"dropout": 0.2},
         "train": {"max_steps": 16, "checkpoint_interval": 1, "grad_accum_steps": 2, "eval_interval": 5}}
# Long enough to signal mid-run; no periodic checkpoint before the end, so the signal's is the one read.
STEPS = 200
SIGNAL_RUN = {"model": {"dropout": 0.2},
              "train": {"max_steps": STEPS, "max_epochs": 10, "checkpoint_interval": 1000,
                        "grad_accum_steps": 2, "eval_interval": 50},
              "runtime": {"log_interval": 1, "progress": True}}


def _curves(project: Path) -> tuple[list, list]:
    """Train rows without the wall-clock column, and val rows."""
    rows = read_tsv(project / "metrics" / "train_log.tsv")
    train_rows = [(r["step"], r["train_loss"], r["lr"]) for r in rows]
    return train_rows, read_tsv(project / "metrics" / "val_log.tsv")


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_rerun_is_bit_identical(tmp_path: Path, shakespeare_text: str) -> None:
    reference = make_project(tmp_path / "reference", shakespeare_text, **EXACT)
    train(write_params(reference, **EXACT), **outputs(reference))  # one thread, like the stage subprocesses

    killed = make_project(tmp_path / "killed", shakespeare_text, **EXACT)
    last = killed / "checkpoints" / "last.pt"
    process = subprocess.Popen(stage_command(), cwd=killed, env=stage_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(random.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = read_checkpoint(last)["step"]
    assert 1 <= killed_at < 16 and not (killed / "models" / "model.pt").exists()

    rerun = run_train_stage(killed)
    assert rerun.returncode == 0, rerun.stdout
    assert f"resuming from checkpoints/last.pt at step {killed_at}/16" in rerun.stdout
    assert_same_weights(model_state(killed / "models" / "model.pt"),
                        model_state(reference / "models" / "model.pt"))
    assert_same_weights(model_state(killed / "checkpoints" / "best_model.pt"),
                        model_state(reference / "checkpoints" / "best_model.pt"))
    assert _curves(killed) == _curves(reference)


@pytest.fixture(scope="module")
def signal_reference(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """An uninterrupted run of SIGNAL_RUN, on one thread like the stage subprocesses."""
    project = make_project(tmp_path_factory.mktemp("reference") / "p", shakespeare_text, **SIGNAL_RUN)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(write_params(project, **{**SIGNAL_RUN, "runtime": {"log_interval": 1}}), **outputs(project))
    finally:
        torch.set_num_threads(threads)
    return project


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_it_stops_at_and_the_rerun_continues_bit_exactly(
        tmp_path: Path, shakespeare_text: str, signal_reference: Path, signum: int) -> None:
    project = make_project(tmp_path / "p", shakespeare_text, **SIGNAL_RUN)
    process = subprocess.Popen(stage_command(), cwd=project, env=stage_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            if line.startswith("step 20/"):
                process.send_signal(signum)
                break
        output = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, output
    stopped = re.search(rf"(?:^|\n)interrupted by {name} after step (\d+)/{STEPS}: checkpoints/last.pt "
                        r"holds it; run the train stage again to continue from there\n$", output)
    assert stopped, f"want one line, on a line of its own, ending the output:\n{output[-2000:]}"
    stopped_at = int(stopped.group(1))
    assert 20 <= stopped_at < STEPS
    assert read_checkpoint(project / "checkpoints" / "last.pt")["step"] == stopped_at
    assert not (project / "models" / "model.pt").exists()

    rerun = run_train_stage(project)
    assert rerun.returncode == 0, rerun.stdout
    assert f"resuming from checkpoints/last.pt at step {stopped_at}/{STEPS}" in rerun.stdout
    assert_same_weights(model_state(project / "models" / "model.pt"),
                        model_state(signal_reference / "models" / "model.pt"))
    assert _curves(project) == _curves(signal_reference)


def test_finished_run_is_trained_again_and_bookkeeping_changes_still_resume(
        tmp_path: Path, shakespeare_text: str, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path / "p", shakespeare_text)
    first = train(write_params(project), **outputs(project))
    capsys.readouterr()
    again = train(write_params(project), **outputs(project))  # as `dvc repro --force` does
    said = capsys.readouterr().out
    assert ("not resuming from checkpoints/last.pt: its run is finished (step 8/8), and running the stage "
            "again means training again; starting fresh") in said.replace(str(project) + "/", "")
    assert "step 8/8 |" in said and again["val_loss"] == first["val_loss"] and again["steps"] == 8

    crash_in_forward(monkeypatch, project, write_params(project))  # an unfinished last.pt: step 4 of 8
    capsys.readouterr()
    same = write_params(project, train={"checkpoint_interval": 3},
                        runtime={"log_interval": 1, "progress": True, "compile": False})
    train(same, **outputs(project))
    assert f"resuming from {project}/checkpoints/last.pt at step 4/8" in capsys.readouterr().out

    crash_in_forward(monkeypatch, project, write_params(project))
    changed = write_params(project, train={"learning_rate": 0.002})
    train(changed, **outputs(project))
    said = capsys.readouterr().out
    assert "not resuming from" in said and "train.learning_rate 0.003 -> 0.002" in said
    stored = read_checkpoint(project / "checkpoints" / "last.pt")["fingerprint"]
    assert stored["train"]["learning_rate"] == 0.002


def test_a_code_change_is_not_resumed(tmp_path: Path, shakespeare_text: str, capsys,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path / "p", shakespeare_text)
    crash_in_forward(monkeypatch, project, write_params(project))
    edited = {**code_hashes(), "llm/model.py": "0" * 64}  # as if llm/model.py had been edited since
    monkeypatch.setattr(llm.train, "code_hashes", lambda: edited)
    capsys.readouterr()
    train(write_params(project), **outputs(project))
    said = capsys.readouterr().out
    assert "checkpoints/last.pt: the code changed (llm/model.py); starting fresh" in said
    assert "step 2/8 |" in said


def test_code_hashes_cover_every_python_file_of_the_train_deps(tmp_path: Path) -> None:
    deps = ["stages/train.py", "llm/train.py", "llm/tokenizers", "data/shards", "data/tokenizer.json"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {"deps": deps}}}))
    for name in ("stages/train.py", "llm/train.py", "llm/tokenizers/bpe.py", "llm/tokenizers/x/y.py",
                 "llm/model.py", "data/shards/meta.json", "data/tokenizer.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    before = code_hashes(tmp_path)
    assert sorted(before) == ["llm/tokenizers/bpe.py", "llm/tokenizers/x/y.py", "llm/train.py",
                              "stages/train.py"]
    (tmp_path / "llm/tokenizers/x/y.py").write_text("# edited\n")
    changed = {path for path, digest in code_hashes(tmp_path).items() if before[path] != digest}
    assert changed == {"llm/tokenizers/x/y.py"}
    # This checkout: the train stage's own code, read from its dvc.yaml, not from a second list.
    train_deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    assert sorted(code_hashes()) == sorted(dep for dep in train_deps if dep.endswith(".py"))


def rerun_with_an_edited_last_pt(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch, capsys,
                                 edit: Callable[[dict], None]) -> str:
    """Crash a run in step 7 (last.pt at step 4), edit last.pt's payload, train again; what that printed."""
    project = make_project(tmp_path / "p", text)
    crash_in_forward(monkeypatch, project, write_params(project))
    last = project / "checkpoints" / "last.pt"
    payload = read_checkpoint(last)
    edit(payload)
    torch.save(payload, last)
    capsys.readouterr()
    train(write_params(project), **outputs(project))
    return capsys.readouterr().out.replace(f"{project}/", "")


def test_a_checkpoint_of_the_older_layout_is_not_resumed(tmp_path: Path, shakespeare_text: str, capsys,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def older_layout(payload: dict) -> None:  # before code hashes: a digest here, the parts elsewhere
        payload["fingerprint"] = "9f2c" * 16

    said = rerun_with_an_edited_last_pt(tmp_path, shakespeare_text, monkeypatch, capsys, older_layout)
    assert "not resuming from checkpoints/last.pt: model." in said and "the code changed" in said


def test_checkpoint_of_another_process_count_says_so(tmp_path: Path, shakespeare_text: str, capsys,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def four_processes(payload: dict) -> None:
        payload["rng"] = payload["rng"] * 4

    said = rerun_with_an_edited_last_pt(tmp_path, shakespeare_text, monkeypatch, capsys, four_processes)
    message = ("the checkpoint was written by 4 processes, this run has 1: dropout draws new random numbers "
               "from here on")
    assert message in said
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert message in readme, "README's troubleshooting section quotes the message"


def test_logs_continue_after_resume_without_duplicates(tmp_path: Path, shakespeare_text: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path / "p", shakespeare_text)
    params = write_params(project)
    crash_in_forward(monkeypatch, project, params)
    before_train, before_val = _curves(project)
    assert [r[0] for r in before_train] == [2, 4] and [r["step"] for r in before_val] == [4]

    train(params, **outputs(project))
    after_train, after_val = _curves(project)
    assert [r[0] for r in after_train] == [2, 4, 6, 8]
    assert [r["step"] for r in after_val] == [4, 8]
    assert after_train[:2] == before_train and after_val[:1] == before_val


def test_an_empty_last_pt_is_not_resumed_and_training_starts_fresh(tmp_path: Path, shakespeare_text: str,
                                                                   capsys) -> None:
    """A 0-byte last.pt (a crash right after its rename, before the fsyncs) is unreadable like any other."""
    project = make_project(tmp_path / "p", shakespeare_text)
    last = project / "checkpoints" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(b"")
    train(write_params(project), **outputs(project))
    said = capsys.readouterr().out
    assert f"not resuming: {last}: not a readable checkpoint (EOFError);" in said
    assert "; starting fresh" in said
    assert read_checkpoint(last)["step"] == 8

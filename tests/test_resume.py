"""Exact resume: a train stage killed with SIGKILL and re-run ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_project import (
    assert_same_weights,
    fail_forward_at,
    make_project,
    model_state,
    one_thread,
    outputs,
    raise_stop,
    run_train_stage,
    stage_command,
    stage_env,
    write_params,
)

from llm.checkpoint import read_checkpoint
from llm.train import train
from llm.trainlog import read_tsv

pytestmark = pytest.mark.usefixtures(one_thread.__name__)
# Dropout > 0 so the restored RNG state matters; accumulation so micro-steps are resumed whole.
EXACT = {"model": {"dropout": 0.2},
         "train": {"max_steps": 16, "checkpoint_interval": 1, "grad_accum_steps": 2, "eval_interval": 5}}


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


def test_stale_checkpoint_is_not_reused_and_bookkeeping_changes_still_resume(
        tmp_path: Path, shakespeare_text: str, capsys) -> None:
    project = make_project(tmp_path / "p", shakespeare_text)
    first = train(write_params(project), **outputs(project))
    capsys.readouterr()

    same = write_params(project, train={"checkpoint_interval": 3},
                        runtime={"log_interval": 1, "progress": True, "compile": False})
    again = train(same, **outputs(project))
    assert "resuming from" in capsys.readouterr().out  # the finished run: nothing left to train
    assert again["val_loss"] == first["val_loss"] and again["steps"] == 8

    changed = write_params(project, train={"learning_rate": 0.002})
    train(changed, **outputs(project))
    said = capsys.readouterr().out
    assert "not resuming from" in said and "train.learning_rate 0.003 -> 0.002" in said
    stored = read_checkpoint(project / "checkpoints" / "last.pt")["fingerprint_parts"]
    assert stored["train"]["learning_rate"] == 0.002


def test_logs_continue_after_resume_without_duplicates(tmp_path: Path, shakespeare_text: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path / "p", shakespeare_text)
    params = write_params(project)
    with monkeypatch.context() as patch:
        fail_forward_at(patch, 7, raise_stop)
        with pytest.raises(KeyboardInterrupt):
            train(params, **outputs(project))
    before_train, before_val = _curves(project)
    assert [r[0] for r in before_train] == [2, 4] and [r["step"] for r in before_val] == [4]

    train(params, **outputs(project))
    after_train, after_val = _curves(project)
    assert [r[0] for r in after_train] == [2, 4, 6, 8]
    assert [r["step"] for r in after_val] == [4, 8]
    assert after_train[:2] == before_train and after_val[:1] == before_val

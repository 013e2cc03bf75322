"""Distributed training: 2 gloo processes on CPU match 1 process with the same global batch."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from pipeline_project import write_params
from train_project import make_project, outputs, run_train_stage

import llm.launch
from llm.errors import ConfigError
from llm.launch import relaunch_under_torchrun, run_to_the_end
from llm.train import Ranks, Trainer, train
from llm.trainlog import read_tsv

pytestmark = pytest.mark.usefixtures("one_thread")
# Dropout 0: the ranks draw no random masks, so 1 and 2 processes compute the same steps.
SAME_RUN = {"model": {"dropout": 0.0},
            "train": {"max_steps": 20, "grad_accum_steps": 2, "eval_interval": 10, "checkpoint_interval": 10}}


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path: Path, shakespeare_text: str) -> None:
    single = make_project(tmp_path / "single", shakespeare_text)
    train(write_params(single, **SAME_RUN, runtime={"log_interval": 1}), **outputs(single))

    double = make_project(tmp_path / "double", shakespeare_text)
    write_params(double, **SAME_RUN, runtime={"log_interval": 1, "nproc_per_node": 2})
    done = run_train_stage(double, timeout=240)
    assert done.returncode == 0, done.stdout
    assert "on cpu x 2" in done.stdout and done.stdout.count("step 20/20") == 1  # rank 0 alone prints

    one, two = (read_tsv(p / "metrics" / "train_log.tsv") for p in (single, double))
    assert [r["step"] for r in two] == list(range(1, 21))
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4), f"step {a['step']}"
    val_one, val_two = (read_tsv(p / "metrics" / "val_log.tsv") for p in (single, double))
    assert [r["val_loss"] for r in val_two] == pytest.approx([r["val_loss"] for r in val_one], rel=1e-4)
    weights = torch.load(double / "models" / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in weights)


def test_relaunches_under_torchrun_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    commands = []
    monkeypatch.setattr(llm.launch, "run_to_the_end", lambda command: commands.append(command) or 3)
    for name in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert relaunch_under_torchrun(1, "stages/train.py") is None
    assert relaunch_under_torchrun(4, "stages/train.py") == 3
    assert commands == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                         "stages/train.py"]]
    monkeypatch.setenv("LOCAL_RANK", "0")  # already a torchrun worker: train here
    assert relaunch_under_torchrun(4, "stages/train.py") is None


def test_the_launcher_passes_sigterm_on_and_returns_the_exit_code_of_its_child(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = ("import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
             f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")

    def terminate_us_when_the_child_is_ready() -> None:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would: to the launcher alone

    previous = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_us_when_the_child_is_ready, daemon=True).start()
    assert run_to_the_end([sys.executable, "-c", child]) == 143
    assert signal.getsignal(signal.SIGTERM) is previous


def test_global_batch_must_split_over_ranks_and_micro_batches(tmp_path: Path, shakespeare_text: str) -> None:
    project = make_project(tmp_path / "p", shakespeare_text)
    params = write_params(project, train={"batch_size": 8, "grad_accum_steps": 2})
    expected = r"train.batch_size = 8: must be a multiple of train.grad_accum_steps \(2\) x processes \(3"
    with pytest.raises(ConfigError, match=expected):
        Trainer(params, torch.device("cpu"), Ranks(rank=0, world=3), **outputs(project))

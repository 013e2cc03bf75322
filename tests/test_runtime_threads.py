"""runtime.threads reaches the trainer: auto puts a small model on one CPU thread, a number is taken as is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_project import make_project, outputs, write_params

from llm.train import train


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("setting,expected", [(0, 1), (3, 3)])
def test_train_runs_on_the_threads_runtime_threads_asks_for(tmp_path: Path, shakespeare_text: str,
                                                            restore_threads, setting: int, expected: int):
    project = make_project(tmp_path / "p", shakespeare_text)
    params = write_params(project, runtime={"threads": setting},
                          train={"max_steps": 2, "eval_interval": 2, "eval_batches": 1,
                                 "checkpoint_interval": 2})
    torch.set_num_threads(2)
    train(params, **outputs(project))
    assert torch.get_num_threads() == expected  # auto: this 0.03M-parameter model takes one thread

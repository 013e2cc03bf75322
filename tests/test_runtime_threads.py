"""runtime.threads reaches the trainer: auto sizes threads by model and batch, a number is taken as is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_project import make_project, outputs, write_params

from llm import hardware
from llm.train import train


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("setting,batch_size,expected", [
    (0, 8, 1),  # auto, 8 x 16 tokens through d_model 32: too little work for a second thread
    (0, 256, hardware.DEFAULT_THREADS),  # auto, 256 x 16 x 32 x 32 = 4.2M multiply-adds a matmul
    (3, 8, 3),  # a number is taken as is
])
def test_train_runs_on_the_threads_runtime_threads_asks_for(tmp_path: Path, shakespeare_text: str,
                                                            restore_threads, setting: int, batch_size: int,
                                                            expected: int):
    project = make_project(tmp_path / "p", shakespeare_text)
    params = write_params(project, runtime={"threads": setting},
                          train={"batch_size": batch_size, "max_steps": 2, "eval_interval": 2,
                                 "eval_batches": 1, "checkpoint_interval": 2})
    torch.set_num_threads(1 if expected != 1 else 2)
    train(params, **outputs(project))
    assert torch.get_num_threads() == expected

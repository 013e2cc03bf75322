"""Faults: SIGKILL mid-stage, a param change after a crash, checkpoints that cannot be written.

The killed runs use real processes (`dvc repro` or a stage script, in their own
session so the whole process group dies at once, as on a power cut or an OOM kill).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
from pipeline_project import build_project, dvc, edit_params, read_params, stages_ran, subprocess_env

import llm.checkpoint
from llm.checkpoint import read_checkpoint, save_training_checkpoint
from llm.config import load_params
from llm.errors import CheckpointError, OutputError
from llm.train import lr_at, train
from llm.trainlog import read_tsv

pytestmark = pytest.mark.slow

# Dropout on (resume must restore the RNG), a checkpoint every step, and enough steps that a
# kill lands mid-run.
FAULT_PARAMS = {
    "encode": {"shard_tokens": 1024},
    "model": {"dropout": 0.1},
    "train": {"max_steps": 120, "checkpoint_interval": 1, "eval_interval": 40, "eval_batches": 2},
    "runtime": {"log_interval": 1},
}
TRAIN_STEPS = FAULT_PARAMS["train"]["max_steps"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, shakespeare: Path) -> Path:
    """The tiny project with its raw data and tokenizer built (stages up to fit_tokenizer)."""
    root = build_project(tmp_path_factory.mktemp("faults") / "project", shakespeare.parent, FAULT_PARAMS)
    dvc(root, "repro", "fit_tokenizer")
    return root


@pytest.fixture(scope="module")
def shards(project: Path) -> Path:
    """The project with its token shards built (a no-op after the encode test)."""
    if not (project / "data/shards/meta.json").is_file():
        dvc(project, "repro", "encode")
    return project


def start(project: Path, *cmd: str, log: Path) -> subprocess.Popen:
    """Start `cmd` in its own process group, its output going to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=project, env=subprocess_env(project), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL the process group of `process` as soon as `ready()` is true; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"process exited ({process.returncode}) before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def training_reached(project: Path, log: Path, step: int):
    """A predicate: last.pt exists and the train log has passed `step`."""
    def ready() -> bool:
        steps = re.findall(r"step (\d+)/\d+", log.read_text(errors="replace"))
        return (project / "checkpoints/last.pt").is_file() and bool(steps) and int(steps[-1]) >= step
    return ready


@pytest.fixture(scope="module")
def interrupted(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the last.pt that a first `dvc repro train`, SIGKILLed mid-run, left behind."""
    project, log = shards, tmp_path_factory.mktemp("killed") / "train.log"
    process = start(project, sys.executable, "-m", "dvc", "repro", "train", log=log)
    kill_when(process, training_reached(project, log, TRAIN_STEPS // 4))
    assert not (project / "models/model.pt").exists(), "the kill did not land mid-run"
    return Path(shutil.copy2(project / "checkpoints/last.pt", log.parent / "last.pt"))


def restore_checkpoint(project: Path, checkpoint: Path) -> int:
    """Put `checkpoint` back as the project's checkpoints/last.pt; returns its step."""
    shutil.rmtree(project / "checkpoints", ignore_errors=True)
    (project / "checkpoints").mkdir()
    shutil.copy2(checkpoint, project / "checkpoints/last.pt")
    return read_checkpoint(checkpoint)["step"]


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The weights stored in a model file."""
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same tensor names, and every tensor bit-for-bit equal."""
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different}"


def files_under(folder: Path) -> dict[str, bytes]:
    """{relative path: content} of every file below `folder`."""
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def temp_shard_written(data: Path) -> bool:
    """True once the encode stage has written a shard into its hidden temp folder under `data`."""
    return any(next(temp.rglob("*.npy"), None) for temp in data.glob(".*"))


def test_killed_encode_reruns_to_identical_shards(project: Path, tmp_path: Path) -> None:
    entries = sorted(os.listdir(project / "data"))
    process = start(project, sys.executable, "-m", "dvc", "repro", "encode", log=tmp_path / "encode.log")
    kill_when(process, lambda: temp_shard_written(project / "data"))
    assert not (project / "data/shards").exists(), "the kill did not land mid-run"

    output = dvc(project, "repro", "encode").stdout  # DVC clears the dead process's lock itself
    assert stages_ran(output) == ["encode"], output
    assert sorted(os.listdir(project / "data")) == sorted([*entries, "shards"]), "stray files under data/"
    rerun = files_under(project / "data/shards")
    assert len([name for name in rerun if name.endswith(".npy")]) > 10, "want many shards to kill between"
    dvc(project, "repro", "--force", "--single-item", "encode")  # a clean run, not restored from cache
    assert files_under(project / "data/shards") == rerun


def test_killed_training_resumes_to_the_uninterrupted_model(shards: Path, interrupted: Path) -> None:
    project = shards
    killed_at = restore_checkpoint(project, interrupted)
    assert 0 < killed_at < TRAIN_STEPS

    output = dvc(project, "repro", "train").stdout  # DVC clears the killed run's locks itself
    assert stages_ran(output) == ["train"], output
    assert f"resuming from checkpoints/last.pt at step {killed_at}/{TRAIN_STEPS}" in output
    resumed = model_tensors(project / "models/model.pt")

    shutil.rmtree(project / "checkpoints")
    output = dvc(project, "repro", "--force", "--single-item", "train").stdout  # not from DVC's cache
    assert stages_ran(output) == ["train"] and "resuming" not in output, output
    assert_same_weights(resumed, model_tensors(project / "models/model.pt"))


def test_code_edit_after_a_kill_starts_fresh(shards: Path, interrupted: Path) -> None:
    project = shards
    restore_checkpoint(project, interrupted)
    model_py = project / "llm" / "model.py"
    original = model_py.read_text(encoding="utf-8")
    model_py.write_text(original + "\n# an edit\n", encoding="utf-8")
    try:
        output = dvc(project, "repro", "train").stdout
    finally:
        model_py.write_text(original, encoding="utf-8")
    assert stages_ran(output) == ["train"], output
    assert "not resuming from checkpoints/last.pt: the code changed (llm/model.py); starting fresh" in output
    assert f"step {TRAIN_STEPS}/{TRAIN_STEPS} |" in output


def test_param_change_after_a_kill_starts_fresh(shards: Path, interrupted: Path) -> None:
    project = shards
    restore_checkpoint(project, interrupted)
    before = read_params(project)["train"]["learning_rate"]
    edit_params(project, train={"learning_rate": before / 2})

    output = dvc(project, "repro", "train").stdout
    assert stages_ran(output) == ["train"], output
    assert f"not resuming from checkpoints/last.pt: train.learning_rate {before} -> {before / 2}" in output
    assert "starting fresh" in output
    # Every logged step used the new schedule: nothing of the killed run (the old peak) was kept.
    cfg = load_params(project / "params.yaml").train
    rows = read_tsv(project / "metrics/train_log.tsv")
    assert [row["step"] for row in rows] == list(range(1, TRAIN_STEPS + 1))
    for row in rows:
        assert row["lr"] == pytest.approx(lr_at(int(row["step"]) - 1, TRAIN_STEPS, cfg), rel=1e-6)


def test_checkpoint_folder_that_is_a_file_is_a_clear_error(shards: Path, tmp_path: Path) -> None:
    project = shards
    blocker = tmp_path / "checkpoints"
    blocker.write_text("a file where the folder should be\n")
    expected = f"{re.escape(str(blocker))}: is a file, but .* must be written inside it as a folder"
    with pytest.raises(OutputError, match=expected):
        train(load_params(project / "params.yaml"), shards_dir=project / "data/shards",
              tokenizer_path=project / "data/tokenizer.json", checkpoint_dir=blocker,
              model_path=tmp_path / "models/model.pt", metrics_dir=tmp_path / "metrics")
    assert not (tmp_path / "models").exists()


def tiny_checkpoint(value: float) -> dict:
    """A small payload shaped like a training checkpoint, recognisable by `value`."""
    return {"model": {"w": torch.full((4, 4), value)}, "model_config": {}, "step": int(value)}


def test_checkpoint_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "not_a_folder").write_text("")
    with pytest.raises(CheckpointError, match="not_a_folder"):
        save_training_checkpoint(tmp_path / "not_a_folder" / "last.pt", tiny_checkpoint(1.0))


def test_save_failing_midway_keeps_the_previous_checkpoint(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    save_training_checkpoint(path, tiny_checkpoint(1.0))

    def disk_full(obj: object, file: BinaryIO) -> None:
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(llm.checkpoint.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_training_checkpoint(path, tiny_checkpoint(2.0))
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["model"]["w"], torch.full((4, 4), 1.0))
    assert os.listdir(path.parent) == ["last.pt"], "the half-written temp file was left behind"

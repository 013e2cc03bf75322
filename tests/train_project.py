"""A tiny training project in a temp folder: byte-token shards of real text, tiny params, the train stage.

Tokens are the UTF-8 bytes of tiny Shakespeare (a byte-level BPE without merges, vocabulary
256), written by the encode stage's writer, so the trainer reads real text and real shards
without waiting for a tokenizer to be fitted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pipeline_project import write_params

import llm.model
from llm.config import Params
from llm.encode import encode_corpus
from llm.tokenizers import BPETokenizer
from llm.train import train

ROOT = Path(__file__).resolve().parents[1]


def write_shards(project: Path, text: str, train_bytes: int = 8192, valid_bytes: int = 2048,
                 shard_tokens: int | None = None) -> Path:
    """data/raw, a byte-level data/tokenizer.json (no merges: token = byte) and data/shards, written by
    the encode stage's own writer; train is cut into two shards (unless `shard_tokens` says otherwise),
    so reads cross a boundary. Returns the shards folder."""
    data = project / "data"
    splits = {"train": text[:train_bytes], "valid": text[train_bytes:train_bytes + valid_bytes],
              "test": text[train_bytes + valid_bytes:train_bytes + 2 * valid_bytes]}
    (data / "raw").mkdir(parents=True, exist_ok=True)
    for split, part in splits.items():
        (data / "raw" / f"{split}.txt").write_text(part, encoding="utf-8")
    BPETokenizer([], special_tokens=()).save(data / "tokenizer.json")
    encode_corpus(data / "raw", data / "tokenizer.json", data / "shards",
                  shard_tokens=shard_tokens or -(-train_bytes // 2), num_workers=1)
    return data / "shards"


def make_project(root: Path, text: str, **sections: dict[str, Any]) -> Path:
    """A project folder with shards, tokenizer and params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    write_shards(root, text)
    write_params(root, **sections)
    return root


def outputs(project: Path) -> dict[str, Path]:
    """Keyword arguments for llm.train.train that keep every file inside `project`."""
    return {"shards_dir": project / "data" / "shards", "tokenizer_path": project / "data" / "tokenizer.json",
            "checkpoint_dir": project / "checkpoints", "model_path": project / "models" / "model.pt",
            "metrics_dir": project / "metrics"}


def stage_env() -> dict[str, str]:
    """Subprocess environment: unbuffered output, no torchrun variables inherited."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def stage_command() -> list[str]:
    """`python stages/train.py` of this checkout."""
    return [sys.executable, str(ROOT / "stages" / "train.py")]


def run_train_stage(project: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the train stage in `project`; stdout and stderr together."""
    return subprocess.run(stage_command(), cwd=project, env=stage_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def model_state(path: Path) -> dict[str, torch.Tensor]:
    """The weights stored in a model file or checkpoint."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical state dicts."""
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def fail_forward_at(monkeypatch: pytest.MonkeyPatch, call: int, make_failure: Callable) -> None:
    """Make the `call`-th training forward pass (1-based) misbehave."""
    forward, calls = llm.model.GPT.forward, [0]

    def patched(self, idx, targets=None, kv_cache=None):
        loss = forward(self, idx, targets, kv_cache)
        if self.training:
            calls[0] += 1
            if calls[0] == call:
                return make_failure(loss)
        return loss

    monkeypatch.setattr(llm.model.GPT, "forward", patched)


def raise_stop(loss: torch.Tensor) -> None:
    """A failure for fail_forward_at: a crash in the middle of a step (as if killed there)."""
    raise KeyboardInterrupt


def crash_in_forward(monkeypatch: pytest.MonkeyPatch, project: Path, params: Params, call: int = 7) -> None:
    """Train `project` until its `call`-th training forward pass crashes: the run ends there, keeping the
    last periodic checkpoint (with the tiny params and the default `call`, last.pt at step 4 of 8)."""
    with monkeypatch.context() as patch:
        fail_forward_at(patch, call, raise_stop)
        with pytest.raises(KeyboardInterrupt):
            train(params, **outputs(project))

"""A tiny training project in a temp folder: byte-token shards of real text, tiny params, the train stage.

Tokens are the UTF-8 bytes of tiny Shakespeare (vocabulary 256), written in the
shard format of llm.shards (meta.json + .npy files), so the trainer reads real
text without waiting for a tokenizer to be fitted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pipeline_project import write_params

import llm.model
from llm.config import Params
from llm.io import sha256_file
from llm.train import train

ROOT = Path(__file__).resolve().parents[1]


def write_shards(project: Path, text: str, train_bytes: int = 8192, valid_bytes: int = 2048) -> None:
    """data/shards (two shards for train, so reads cross a boundary) and a stand-in data/tokenizer.json."""
    tokenizer = project / "data" / "tokenizer.json"
    tokenizer.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.write_text(json.dumps({"type": "bytes", "version": 1}), encoding="utf-8")
    data = text.encode("utf-8")
    splits = {"train": data[:train_bytes], "valid": data[train_bytes:train_bytes + valid_bytes],
              "test": data[train_bytes + valid_bytes:train_bytes + 2 * valid_bytes]}
    meta: dict[str, Any] = {"format_version": 1, "tokenizer_sha256": sha256_file(tokenizer),
                            "vocab_size": 256, "eot_id": None, "dtype": "uint16", "splits": {}}
    for split, raw in splits.items():
        tokens = np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)
        (project / "data" / "shards" / split).mkdir(parents=True, exist_ok=True)
        names = []
        for index, part in enumerate(np.array_split(tokens, 2 if split == "train" else 1)):
            names.append(f"{split}/shard_{index:05d}.npy")
            np.save(project / "data" / "shards" / names[-1], part)
        meta["splits"][split] = {"num_tokens": len(tokens), "num_bytes": len(raw),
                                 "num_words": len(raw.split()), "num_lines": raw.count(b"\n"),
                                 "shards": names}
    (project / "data" / "shards" / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


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

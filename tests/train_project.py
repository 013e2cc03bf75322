"""A tiny training project in a temp folder: byte-token shards of real text, tiny params, the train stage;
and a finished project (`make_eval_project`) with everything evaluate, samples and `llm generate` read.

Tokens are the UTF-8 bytes of tiny Shakespeare (a byte-level BPE without merges, vocabulary
256), written by the encode stage's writer, so the trainer reads real text and real shards
without waiting for a tokenizer to be fitted.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from pipeline_project import write_params

import llm.model
from llm.checkpoint import save_model_file
from llm.config import ModelConfig, Params
from llm.encode import encode_corpus
from llm.io import sha256_file
from llm.model import GPT
from llm.shards import TokenShards
from llm.tokenizers import BPETokenizer
from llm.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"d_model": 32, "num_heads": 2, "num_layers": 2, "d_ff": 64, "max_seq_length": 32,
              "dropout": 0.0}


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


def make_eval_project(root: Path, text: str, steps: int = 30) -> Path:
    """A project folder with params.yaml, a BPE tokenizer, shards, a briefly trained models/model.pt
    and training logs: everything the evaluate stage and `llm generate` read."""
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    parts = {"train": text[:20000], "valid": text[20000:24000], "test": text[24000:27000]}
    for split, part in parts.items():
        (raw / f"{split}.txt").write_text(part, encoding="utf-8")
    tokenizer_path = root / "data" / "tokenizer.json"
    BPETokenizer.train(parts["train"], vocab_size=300, num_workers=1).save(tokenizer_path)
    encode_corpus(raw, tokenizer_path, root / "data" / "shards", shard_tokens=1024, num_workers=1)
    config = ModelConfig(vocab_size=300, **TINY_MODEL)
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = TokenShards(root / "data" / "shards", "train")
    starts = np.random.default_rng(0).integers(0, len(train) - 33, size=(steps, 8))
    for batch in starts:
        windows = torch.from_numpy(np.stack([train.read(int(s), 33) for s in batch]))
        loss = model(windows[:, :-1], windows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_model_file(root / "models" / "model.pt", model, config, sha256_file(tokenizer_path),
                    {"step": steps, "metrics": {"val_loss": 4.0},
                     "params": {"model": TINY_MODEL, "train": {"learning_rate": 3e-3}}})
    (root / "metrics").mkdir()
    rows = "".join(f"{s}\t{6 - s / 10}\t0.003\t1000\n" for s in range(1, 31))
    (root / "metrics" / "train_log.tsv").write_text("step\ttrain_loss\tlr\ttokens_per_sec\n" + rows)
    (root / "metrics" / "val_log.tsv").write_text("step\tval_loss\tval_bpb\n10\t5.5\t3.1\n30\t4.0\t2.5\n")
    params = {"model": TINY_MODEL, "eval": {"batch_size": 4, "stride": 16},
              "generate": {"prompt": "ROMEO:", "max_length": 20, "num_samples": 2, "temperature": 0.8},
              "runtime": {"device": "cpu", "precision": "fp32", "progress": False}}
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return root


def run_stage_in_process(project: Path, stage: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run a stage script as `python stages/<stage>.py` would, in this process; its exit code."""
    monkeypatch.chdir(project)
    try:
        runpy.run_path(str(ROOT / "stages" / f"{stage}.py"), run_name="__main__")
    except SystemExit as exited:
        return exited.code
    return 0

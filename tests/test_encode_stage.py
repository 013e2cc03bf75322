"""stages/encode.py run as DVC runs it: a subprocess in a project directory with params.yaml and data/."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from llm.io import sha256_file
from llm.shards import TokenShards, read_meta
from llm.tokenizers import BPETokenizer

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory, shakespeare: Path) -> Path:
    """A small byte-level BPE with <|endoftext|>, fitted once for the module."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    BPETokenizer.train(shakespeare.read_text(encoding="utf-8")[:100_000], vocab_size=400).save(path)
    return path


@pytest.fixture
def project(tmp_path: Path, tokenizer_file: Path, wikitext_valid: Path) -> Path:
    """A project dir: params.yaml (1,024-token shards, 1 worker), data/raw splits, data/tokenizer.json."""
    params = {"encode": {"shard_tokens": 1024}, "runtime": {"num_workers": 1, "progress": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    text = wikitext_valid.read_text(encoding="utf-8")
    cuts = {"train": (0, 20_000), "valid": (20_000, 26_000), "test": (26_000, 30_000)}
    for split, (begin, end) in cuts.items():
        (raw / f"{split}.txt").write_text(text[begin:end], encoding="utf-8")
    (tmp_path / "data" / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return tmp_path


STAGE = [sys.executable, str(PROJECT_ROOT / "stages" / "encode.py")]


def run_encode(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run(STAGE, cwd=project, capture_output=True, text=True, timeout=120)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_stage_writes_shards_and_meta(project: Path) -> None:
    result = run_encode(project)
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["train", "valid", "test"]
    shards_dir = project / "data" / "shards"
    meta = read_meta(shards_dir)
    assert meta["tokenizer_sha256"] == sha256_file(project / "data" / "tokenizer.json")
    assert meta["tokenizer_type"] == "bpe" and meta["dtype"] == "uint16" and meta["vocab_size"] == 400
    train = meta["splits"]["train"]
    sizes = [len(np.load(shards_dir / name)) for name in train["shards"]]
    assert len(sizes) > 2 and max(sizes) == 1024 and sum(sizes) == train["num_tokens"]
    assert train["num_bytes"] == (project / "data" / "raw" / "train.txt").stat().st_size
    tokens = TokenShards(shards_dir, "train")
    assert len(tokens) == train["num_tokens"] and tokens.read(0, len(tokens)).max() < 400
    assert sorted(p.name for p in (project / "data").iterdir()) == ["raw", "shards", "tokenizer.json"]
    assert shards_dir.stat().st_mode == (project / "data" / "raw").stat().st_mode  # not mkdtemp's 0700


@pytest.mark.parametrize("breakage, message", [
    ("no_tokenizer", r"data/tokenizer\.json: not found; run `dvc repro fit_tokenizer`"),
    ("no_split", r"data/raw/test\.txt: not found; run `dvc repro download`"),
    ("empty_split", r"data/raw/valid\.txt: the split is empty"),
    ("bad_param", r"params\.yaml: encode\.shard_tokens = 10: must be >= 1024"),
])
def test_stage_bad_input_is_one_line_and_exit_2(project: Path, breakage: str, message: str) -> None:
    data = project / "data"
    if breakage == "no_tokenizer":
        (data / "tokenizer.json").unlink()
    elif breakage == "no_split":
        (data / "raw" / "test.txt").unlink()
    elif breakage == "empty_split":
        (data / "raw" / "valid.txt").write_text("")
    else:
        (project / "params.yaml").write_text("encode:\n  shard_tokens: 10\n")
    result = run_encode(project)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    assert re.search(message, result.stderr), result.stderr
    assert not (data / "shards").exists()
    assert not list(data.glob(".tmp-shards-*"))


@pytest.mark.slow
def test_run_killed_midway_is_redone_identically(project: Path, tmp_path_factory: pytest.TempPathFactory,
                                                 wikitext_valid: Path) -> None:
    shutil.copy(wikitext_valid, project / "data" / "raw" / "train.txt")  # long enough to be caught midway
    fresh = tmp_path_factory.mktemp("fresh") / "project"
    shutil.copytree(project, fresh)
    killed = subprocess.Popen(STAGE, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 60
    while not list((project / "data").glob(".tmp-shards-*/shards/train/shard_00001.npy")):
        assert killed.poll() is None and time.monotonic() < deadline, "the stage ended before the kill"
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert list((project / "data").glob(".tmp-shards-*")) and not (project / "data" / "shards").exists()
    for directory in (project, fresh):
        result = run_encode(directory)
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (project / "data").iterdir()) == ["raw", "shards", "tokenizer.json"]
    assert tree_bytes(project / "data" / "shards") == tree_bytes(fresh / "data" / "shards")

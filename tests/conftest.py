"""Shared fixtures: the offline corpora in ../shared/data and a clean environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora (tiny Shakespeare, WikiText-2 valid) beside the project; read-only."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: tests need ../shared/data beside the project")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare(shared_data: Path) -> Path:
    return shared_data / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="session")
def shakespeare_text(shakespeare: Path) -> str:
    """Tiny Shakespeare as one string (read once per session)."""
    return shakespeare.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def wikitext_valid(shared_data: Path) -> Path:
    return shared_data / "wikitext-2" / "valid.txt"


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Tiny models on one CPU thread: faster than two on a busy shared machine (no OpenMP barriers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def eval_project(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """A finished tiny project (raw text, tokenizer, shards, a briefly trained model, training logs), built
    once: what evaluate, samples and `llm generate` read. Tests that break something work on a copy."""
    from train_project import make_eval_project

    return make_eval_project(tmp_path_factory.mktemp("project"), shakespeare_text)

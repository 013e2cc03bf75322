"""Reading token shards: a split as one sequence across shard files, training-window order, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from train_project import write_shards

from llm.errors import DataError
from llm.shards import TokenShards, WindowSampler, get_batch, read_meta


@pytest.fixture
def small_shards(tmp_path: Path, shakespeare_text: str) -> tuple[Path, np.ndarray]:
    """Shakespeare's first 5,000 bytes as byte-token train shards of 1,000 tokens, and those tokens."""
    shards_dir = write_shards(tmp_path, shakespeare_text, train_bytes=5000, valid_bytes=100,
                              shard_tokens=1000)
    return shards_dir, np.frombuffer(shakespeare_text[:5000].encode(), dtype=np.uint8).astype(np.int64)


def test_token_shards_read_crosses_shard_boundaries(small_shards) -> None:
    shards_dir, expected = small_shards
    tokens = TokenShards(shards_dir, "train")
    assert len(tokens) == len(expected) == 5000
    assert tokens.num_bytes == 5000
    assert tokens.num_lines == expected.tolist().count(ord("\n")) + 1  # the cut leaves a last partial line
    for start, length in [(0, 10), (990, 20), (995, 2010), (0, 5000), (4999, 1), (1000, 0)]:
        got = tokens.read(start, length)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected[start:start + length])
    with pytest.raises(IndexError):
        tokens.read(4990, 11)


def test_token_shards_errors(small_shards, tmp_path: Path) -> None:
    shards_dir, _ = small_shards
    with pytest.raises(DataError, match=r"no split 'dev'"):
        TokenShards(shards_dir, "dev")
    with pytest.raises(DataError, match=r"meta\.json: not found; run `dvc repro encode`"):
        read_meta(tmp_path / "nowhere")
    (shards_dir / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json: corrupt"):
        read_meta(shards_dir)


def test_missing_shard_file_is_a_data_error(small_shards) -> None:
    shards_dir, _ = small_shards
    (shards_dir / "train" / "shard_00002.npy").unlink()
    with pytest.raises(DataError, match=r"cannot read a train shard"):
        TokenShards(shards_dir, "train")


def test_window_sampler_is_a_deterministic_permutation() -> None:
    sampler = WindowSampler(num_tokens=1001, seq_len=10, batch_size=7, seed=3)
    assert sampler.num_windows == 100 and sampler.steps_per_epoch == 14
    epoch0 = np.concatenate([sampler.starts(0, step) for step in range(sampler.steps_per_epoch)])
    assert epoch0.dtype == np.int64 and len(epoch0) == 98
    assert len(set(epoch0.tolist())) == 98 and set(epoch0.tolist()) <= set(range(0, 1000, 10))
    fresh = WindowSampler(num_tokens=1001, seq_len=10, batch_size=7, seed=3)
    np.testing.assert_array_equal(fresh.starts(0, 5), sampler.starts(0, 5))  # resume: (epoch, step) only
    assert not np.array_equal(sampler.starts(1, 0), sampler.starts(0, 0))
    other_seed = WindowSampler(num_tokens=1001, seq_len=10, batch_size=7, seed=4)
    assert not np.array_equal(other_seed.starts(0, 0), sampler.starts(0, 0))


def test_window_sampler_covers_all_windows_once_when_batches_divide() -> None:
    sampler = WindowSampler(num_tokens=101, seq_len=5, batch_size=4, seed=0)
    starts = np.concatenate([sampler.starts(2, step) for step in range(sampler.steps_per_epoch)])
    assert sorted(starts.tolist()) == list(range(0, 100, 5))


def test_window_sampler_too_small_split_names_the_fix() -> None:
    fix = r"100 tokens.*seq_len 64.*batch_size 2.*smaller model\.max_seq_length"
    with pytest.raises(DataError, match=fix):
        WindowSampler(num_tokens=100, seq_len=64, batch_size=2, seed=0)


@pytest.mark.slow  # the first torch import
def test_get_batch_shapes_and_shift(small_shards) -> None:
    shards_dir, expected = small_shards
    tokens = TokenShards(shards_dir, "train")
    starts = np.array([0, 995, 3000], dtype=np.int64)
    x, y = get_batch(tokens, starts, seq_len=16)
    assert x.shape == y.shape == (3, 16)
    assert str(x.dtype) == "torch.int64" and x.device.type == "cpu"
    assert x[:, 1:].tolist() == y[:, :-1].tolist()
    assert x[1].tolist() == expected[995:1011].tolist() and y[2].tolist() == expected[3001:3017].tolist()

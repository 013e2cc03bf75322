"""What the trainer reads: token shards, the order of training windows, the fixed validation batches.

Every batch is a function of (params, shards, step), which is what makes a resumed run equal an
uninterrupted one. Under DDP, rank r of W takes the r-th contiguous slice of each global batch and
splits it into `train.grad_accum_steps` micro-batches; validation batches are dealt round-robin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llm.config import Params, TrainConfig
from llm.errors import ConfigError, DataError
from llm.io import sha256_file
from llm.shards import TokenShards, WindowSampler, get_batch, read_meta


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """max_epochs passes over the windows, capped by max_steps when it is set."""
    steps = cfg.max_epochs * steps_per_epoch
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


class TrainData:
    """The shards of one run, checked against the tokenizer, with the batch layout of this rank."""

    def __init__(self, params: Params, shards_dir: Path, tokenizer_path: Path, rank: int = 0,
                 world: int = 1) -> None:
        cfg = params.train
        meta = read_meta(shards_dir)
        if not tokenizer_path.is_file():
            raise DataError(f"{tokenizer_path}: not found; run `dvc repro fit_tokenizer`")
        self.tokenizer_sha256 = sha256_file(tokenizer_path)
        if meta.get("tokenizer_sha256") != self.tokenizer_sha256:
            raise DataError(f"{shards_dir}: encoded with another tokenizer than {tokenizer_path}; "
                            "run `dvc repro encode`")
        self.shards_sha256 = sha256_file(shards_dir / "meta.json")
        self.model_config = dataclasses.replace(params.model, vocab_size=int(meta["vocab_size"]))
        self.seq_len = self.model_config.max_seq_length
        if cfg.batch_size % (world * cfg.grad_accum_steps):
            raise ConfigError(f"train.batch_size = {cfg.batch_size}: must be a multiple of "
                              f"train.grad_accum_steps ({cfg.grad_accum_steps}) x processes ({world}, "
                              "runtime.nproc_per_node)")
        self.rank, self.world, self.accum = rank, world, cfg.grad_accum_steps
        self.rank_batch = cfg.batch_size // world
        self.micro_batch = self.rank_batch // cfg.grad_accum_steps
        self.train_tokens = TokenShards(shards_dir, "train")
        self.val_tokens = TokenShards(shards_dir, "valid")
        self.sampler = WindowSampler(len(self.train_tokens), self.seq_len, cfg.batch_size, cfg.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = total_steps(cfg, self.steps_per_epoch)
        self.val_starts = self._validation_starts(shards_dir, cfg.batch_size // cfg.grad_accum_steps,
                                                  cfg.eval_batches)

    def _validation_starts(self, shards_dir: Path, size: int, limit: int) -> list[np.ndarray]:
        """Fixed batches of non-overlapping validation windows (the first `limit`, if set)."""
        num_windows = (len(self.val_tokens) - 1) // self.seq_len
        if num_windows == 0:
            raise DataError(f"{shards_dir}: the valid split has {len(self.val_tokens)} tokens, fewer "
                            f"than model.max_seq_length + 1 ({self.seq_len + 1}); use a shorter context")
        starts = np.arange(num_windows, dtype=np.int64) * self.seq_len
        batches = [starts[i:i + size] for i in range(0, num_windows, size)]
        return batches[:limit] if limit else batches

    def micro_batches(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (inputs, targets) micro-batches of 0-based optimizer step `step`, on the CPU."""
        epoch, position = divmod(step, self.steps_per_epoch)
        starts = self.sampler.starts(epoch, position)
        mine = starts[self.rank * self.rank_batch:(self.rank + 1) * self.rank_batch]
        for micro in range(self.accum):
            yield get_batch(self.train_tokens, mine[micro * self.micro_batch:(micro + 1) * self.micro_batch],
                            self.seq_len)

    def validation_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the validation batches, on the CPU."""
        for starts in self.val_starts[self.rank::self.world]:
            yield get_batch(self.val_tokens, starts, self.seq_len)

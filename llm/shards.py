"""Token shards as train and evaluate read them: memory-mapped splits, training-window order, batches.

The format (written by llm.encode, the encode stage): `<shards_dir>/<split>/shard_NNNNN.npy`,
one-dimensional arrays of token ids (uint16 when the vocabulary fits, else uint32) that
concatenate to the split, and `<shards_dir>/meta.json`: the format version, the tokenizer's
sha256, type and vocab_size, the end-of-text and unknown-word ids (null when there is none),
the dtype, and per split its token count, UTF-8 bytes, words (whitespace words plus one per
line) and lines, and its shard files.

:class:`TokenShards` memory-maps one split as one sequence, :class:`WindowSampler` orders
training windows as a pure function of (seed, epoch, step), and :func:`get_batch` turns window
starts into `(x, y)` tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llm.errors import DataError

if TYPE_CHECKING:  # torch is imported lazily: the encode stage's workers import this module too
    import torch

FORMAT_VERSION = 2  # 2: meta.json records unk_id


def read_meta(shards_dir: str | Path) -> dict:
    """The shards' meta.json; DataError if it is missing or corrupt (re-run the encode stage)."""
    path = Path(shards_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run `dvc repro encode` (or python stages/encode.py)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: corrupt ({exc}); run `dvc repro encode` again") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "splits" not in meta:
        raise DataError(f"{path}: not a format_version {FORMAT_VERSION} shard index; "
                        "run `dvc repro encode` again")
    return meta


def _check_ids(path: Path, array: np.ndarray, vocab_size: object) -> None:
    """DataError unless `array` is a 1-D array of unsigned token ids below `vocab_size`: an id out of range
    would otherwise fail deep inside an embedding lookup. One pass over the memory map, at memory speed."""
    if array.ndim != 1 or array.dtype.kind != "u":
        raise DataError(f"{path}: holds {array.dtype} values of shape {array.shape}, not a list of token "
                        "ids; run `dvc repro encode` again")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise DataError(f"{path.parent.parent / 'meta.json'}: vocab_size {vocab_size!r} is not a size; "
                        "run `dvc repro encode` again")
    largest = int(array.max()) if len(array) else -1
    if largest >= vocab_size:
        raise DataError(f"{path}: holds token id {largest}, but vocab_size is {vocab_size} (meta.json); "
                        "the shard is corrupt or from another tokenizer: run `dvc repro encode` again")


class TokenShards:
    """One split as one token sequence, memory-mapped across its shard files."""

    def __init__(self, shards_dir: str | Path, split: str) -> None:
        shards_dir = Path(shards_dir)
        meta = read_meta(shards_dir)
        info = meta["splits"].get(split)
        if info is None:
            raise DataError(f"{shards_dir / 'meta.json'}: no split {split!r} (it has "
                            f"{', '.join(meta['splits'])}); run `dvc repro encode`")
        try:
            self._arrays = [np.load(shards_dir / name, mmap_mode="r") for name in info["shards"]]
        except (OSError, ValueError) as exc:
            raise DataError(f"{shards_dir}: cannot read a {split} shard ({exc}); "
                            "run `dvc repro encode` again") from None
        for name, array in zip(info["shards"], self._arrays):
            _check_ids(shards_dir / name, array, meta.get("vocab_size"))
        self._offsets = np.cumsum([0] + [len(a) for a in self._arrays])
        if self._offsets[-1] != info["num_tokens"]:
            raise DataError(f"{shards_dir}: the {split} shards hold {self._offsets[-1]} tokens but meta.json "
                            f"says {info['num_tokens']}; run `dvc repro encode` again")
        self.split = split
        self.num_bytes: int = info["num_bytes"]
        self.num_words: int = info["num_words"]
        self.num_lines: int = info["num_lines"]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def bits_per_byte(self, loss: float) -> float:
        """A mean loss scored on this split (nats per token) in bits per UTF-8 byte of its text.

        The loss times the split's tokens per byte, over ln 2: training's `val_bpb` (a sample of
        windows) and evaluate's `<split>_bpb` (every token) are both this.
        """
        return loss * len(self) / (math.log(2) * self.num_bytes)

    def word_perplexity(self, loss: float) -> float:
        """A mean loss scored on this split (nats per token) as a perplexity per word of its text
        (whitespace words plus one per line, the count WikiText papers divide by)."""
        return math.exp(loss * len(self) / self.num_words)

    def read(self, start: int, length: int) -> np.ndarray:
        """An int64 copy of tokens[start:start + length], crossing shard boundaries as needed."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"{self.split}: tokens [{start}, {start + length}) outside [0, {len(self)})")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        done = 0
        while done < length:
            local = start + done - int(self._offsets[shard])
            take = min(length - done, len(self._arrays[shard]) - local)
            out[done:done + take] = self._arrays[shard][local:local + take]
            done, shard = done + take, shard + 1
        return out


class WindowSampler:
    """Training-window order, a pure function of (seed, epoch, step): resuming needs only (epoch, step)."""

    def __init__(self, num_tokens: int, seq_len: int, batch_size: int, seed: int) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len = {seq_len}, batch_size = {batch_size}: both must be >= 1")
        self.num_tokens, self.seq_len, self.batch_size, self.seed = num_tokens, seq_len, batch_size, seed
        self.num_windows = max(num_tokens - 1, 0) // seq_len
        self.steps_per_epoch = self.num_windows // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"a split of {num_tokens} tokens holds {self.num_windows} windows of "
                            f"seq_len {seq_len} (+1), fewer than one batch of batch_size {batch_size}; "
                            "use a smaller model.max_seq_length or train.batch_size")
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def starts(self, epoch: int, step: int) -> np.ndarray:
        """(batch_size,) int64 token offsets of the windows of global batch `step` of `epoch`."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside [0, {self.steps_per_epoch}) steps per epoch")
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        batch = self._perm[step * self.batch_size:(step + 1) * self.batch_size]
        return batch.astype(np.int64) * self.seq_len


def get_batch(tokens: TokenShards, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y (y is x shifted by one), LongTensors of shape (len(starts), seq_len) on CPU."""
    import torch

    windows = np.stack([tokens.read(int(start), seq_len + 1) for start in starts])
    batch = torch.from_numpy(windows)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

"""Held-out metrics over whole splits: loss, perplexity, bits per byte and word-level perplexity.

Every token after the first of a split is scored exactly once (the first has nothing to be predicted
from), so a split of N tokens yields N - 1 scored tokens, and `loss` is the summed negative
log-likelihood over those N - 1. `ppl` is exp(loss); `bpb` and `word_ppl` turn the same mean loss into
bits per UTF-8 byte and perplexity per word with the split's tokens per byte and per word
(`TokenShards.bits_per_byte`, the definition training's `val_bpb` uses too).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from llm.errors import CheckpointError, DataError
from llm.shards import TokenShards, read_meta


def window_plan(num_tokens: int, window: int, stride: int = 0) -> list[tuple[int, int, int]]:
    """(begin, length, skip) per window: inputs tokens[begin:begin+length], targets shifted by one,
    the first `skip` targets already scored by an earlier window.

    stride 0 (or == window) gives non-overlapping windows. A smaller stride is the sliding-window scheme
    of the Hugging Face perplexity guide: windows advance by `stride`, each scores only the targets
    that no earlier window scored (the first window scores all), so every target is scored once with
    at least window - stride tokens of context; the final, shorter window is included.
    """
    stride = stride or window
    if not 0 < stride <= window:
        raise DataError(f"eval.stride = {stride}: must be in 1..{window} (the context), or 0")
    num_targets = num_tokens - 1
    plan, begin, scored_until = [], 0, 0
    while scored_until < num_targets:
        end = min(begin + window, num_targets)
        plan.append((begin, end - begin, scored_until - begin))
        scored_until, begin = end, begin + stride
    return plan


def _batch(shards: TokenShards, windows: list[tuple[int, int, int]], device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, L) padded with 0 and targets (B, L) with -1 wherever nothing is scored."""
    width = max(length for _, length, _ in windows)
    inputs = np.zeros((len(windows), width), dtype=np.int64)
    targets = np.full((len(windows), width), -1, dtype=np.int64)
    for row, (begin, length, skip) in enumerate(windows):
        tokens = shards.read(begin, length + 1)
        inputs[row, :length] = tokens[:-1]
        targets[row, skip:length] = tokens[1 + skip:]
    return torch.from_numpy(inputs).to(device), torch.from_numpy(targets).to(device)


@torch.inference_mode()
def evaluate_split(model: torch.nn.Module, shards: TokenShards, *, window: int, stride: int = 0,
                   batch_size: int = 8, progress: bool = False) -> tuple[float, int]:
    """Summed nats and the number of scored tokens over a whole split (see `window_plan`).

    Sums rather than means, so that splits, batches of different sizes and ranks combine exactly:
    every normalisation (per token, per byte, per word) is then one division at the end. Under
    torch.distributed each rank scores every world_size-th window and the sums are all-reduced.
    model(inputs) must return the logits (B, T, V) of every position; run under the caller's
    autocast, the cross-entropy itself is taken in fp32. Deterministic for a given model and data.
    """
    if len(shards) < 2:
        raise DataError(f"split {shards.split!r} has {len(shards)} tokens: at least 2 are needed to score")
    plan = window_plan(len(shards), window, stride)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = plan[rank::world]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed nats, scored tokens
    batches = range(0, len(mine), batch_size)
    for start in tqdm(batches, desc=f"eval {shards.split}", unit="batch", disable=not progress):
        inputs, targets = _batch(shards, mine[start:start + batch_size], device)
        logits = model(inputs)
        nats = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1,
                               reduction="sum")
        totals[0] += nats.double()
        totals[1] += (targets >= 0).sum()
    model.train(was_training)
    if world > 1:
        dist.all_reduce(totals)
    return totals[0].item(), int(totals[1].item())


def split_metrics(shards: TokenShards, total_nats: float, scored_tokens: int) -> dict[str, float | int]:
    """The four comparable numbers of one split, keyed `<split>_loss`, `_ppl`, `_bpb`, `_word_ppl`."""
    loss, split = total_nats / scored_tokens, shards.split
    return {
        f"{split}_loss": loss,
        f"{split}_ppl": math.exp(loss),
        f"{split}_bpb": shards.bits_per_byte(loss),
        f"{split}_word_ppl": shards.word_perplexity(loss),
        f"{split}_tokens": scored_tokens,
    }


def token_count(shards: TokenShards, token_id: int | None, block: int = 1 << 22) -> int:
    """How often `token_id` occurs in the split (0 for None), read `block` tokens at a time."""
    if token_id is None:
        return 0
    return sum(int(np.count_nonzero(shards.read(start, min(block, len(shards) - start)) == token_id))
               for start in range(0, len(shards), block))


def unk_notes(metrics: dict[str, float | int]) -> list[str]:
    """One line per split whose text the tokenizer could not fully represent (`<split>_unk_rate` > 0):
    its bpb and word_ppl score `<unk>` in place of the words, so they are not comparable with a
    lossless tokenizer's."""
    notes = []
    for key, rate in metrics.items():
        if key.endswith("_unk_rate") and rate > 0:
            split = key[:-len("_unk_rate")]
            notes.append(f"note: {rate:.1%} of the {split} tokens are <unk>: {split}_bpb and "
                         f"{split}_word_ppl score <unk> instead of the words it replaced, so they are not "
                         "comparable with a lossless tokenizer's (bpe); compare them between runs of one "
                         "word-level vocabulary (on WikiText's tokenized release, whose text holds <unk>, "
                         f"{split}_word_ppl is the number papers report)")
    return notes


def evaluate_splits(model: torch.nn.Module, shards_dir: str | os.PathLike, splits: list[str], *,
                    stride: int = 0, batch_size: int = 8, progress: bool = False) -> dict[str, float | int]:
    """Flat metrics (`valid_loss`, `valid_ppl`, ..., `valid_tokens`, `valid_unk_rate`, `test_loss`, ...) for
    each split; `<split>_unk_rate` is the share of the split's tokens that are `<unk>` (0 for BPE)."""
    meta = read_meta(shards_dir)
    metrics: dict[str, float | int] = {}
    for split in splits:
        if split not in meta["splits"]:
            raise DataError(f"{Path(shards_dir) / 'meta.json'}: no split {split!r} (has "
                            f"{', '.join(meta['splits'])}); fix eval.splits or re-run the encode stage")
        shards = TokenShards(shards_dir, split)
        nats, scored = evaluate_split(model, shards, window=model.config.max_seq_length, stride=stride,
                                      batch_size=batch_size, progress=progress)
        metrics.update(split_metrics(shards, nats, scored))
        metrics[f"{split}_unk_rate"] = token_count(shards, meta.get("unk_id")) / len(shards)
    return metrics


def check_same_tokenizer(payload: dict[str, Any], model_path: str | os.PathLike, meta: dict[str, Any],
                         shards_dir: str | os.PathLike) -> None:
    """Refuse to score shards encoded by another tokenizer than the model was trained on: its ids would
    mean other text, and every metric would be silently wrong."""
    trained, encoded = payload.get("tokenizer_sha256"), meta.get("tokenizer_sha256")
    if trained is not None and trained != encoded:
        raise CheckpointError(f"{model_path}: trained with tokenizer {str(trained)[:12]}..., but "
                              f"{Path(shards_dir) / 'meta.json'} was encoded with {str(encoded)[:12]}...; "
                              "re-run the pipeline (`dvc repro`) so model and shards come from one run")

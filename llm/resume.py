"""Where a training run starts: checkpoints/last.pt, train.resume or scratch, and the lines that say why.

The policy, in order:

1. `checkpoints/last.pt` is continued exactly (weights, optimizer, step, logs and RNG) when its
   fingerprint matches this run (params, shards, tokenizer and code: llm.fingerprint), it started
   from the same `train.resume`, and its run is unfinished. A finished run is never continued:
   DVC re-runs the train stage only when an input changed or the user forces it, and either way
   they mean "train".
2. Otherwise `train.resume`, when set: its weights always; its optimizer state when the same
   optimizer wrote it; its step, logs and RNG too when it has the same data order and is unfinished.
3. Otherwise a fresh start.

`train.resume` is a param, so it stays in params.yaml for every later run: whenever it is set, the
first line printed names it and says how to clear it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.checkpoint import TrainingCheckpoint, load_weights
from llm.config import ModelConfig, TrainConfig
from llm.errors import CheckpointError
from llm.fingerprint import Fingerprint, describe_changes, dict_changes

KEEP_NOTE = ("train.resume stays in params.yaml for every later run; clear it with "
             "`dvc exp run -S train.resume=\"\"` or by editing params.yaml")


@dataclass(frozen=True)
class Start:
    """What a run loads before its first step, and the lines that explain it."""

    checkpoint: TrainingCheckpoint | None = None  # None: fresh weights
    optimizer: bool = False                       # also load optimizer (and grad scaler) state
    position: bool = False                        # also load step, logs and RNG: continue exactly
    lines: tuple[str, ...] = ()


def plan_start(last: Path, cfg: TrainConfig, fingerprint: Fingerprint, model_config: ModelConfig,
               total_steps: int) -> Start:
    """Decide how this run starts (see the module docstring); CheckpointError for a bad train.resume."""
    lines: list[str] = []
    start = _continue_last(last, cfg.resume, fingerprint, total_steps, lines)
    if start is not None:
        origin = f"continuing {last}, the run that started from it; " if cfg.resume else ""
    elif cfg.resume:
        start = _start_from(Path(cfg.resume), cfg, fingerprint, model_config, total_steps, lines)
        origin = "starting from it; "
    else:
        start = Start()
    if cfg.resume:
        lines.insert(0, f"train.resume = {cfg.resume}: {origin}{KEEP_NOTE}")
    return dataclasses.replace(start, lines=tuple(lines))


def _continue_last(last: Path, explicit: str, fingerprint: Fingerprint, total_steps: int,
                   lines: list[str]) -> Start | None:
    """An exact resume of last.pt when it belongs to this run and is unfinished; else None (saying why)."""
    if not last.is_file():
        return None
    then = "starting from train.resume" if explicit else "starting fresh"
    try:
        checkpoint = TrainingCheckpoint.read(last)
    except CheckpointError as exc:
        lines.append(f"not resuming: {exc}; {then}")
        return None
    reasons = describe_changes(Fingerprint.from_dict(checkpoint.fingerprint), fingerprint)
    if checkpoint.origin != explicit:
        reasons.append(f"it continues a run started from {checkpoint.origin or 'scratch'} but "
                       f"train.resume is {explicit!r}")
    if not reasons and checkpoint.step >= total_steps:
        reasons.append(f"its run is finished (step {checkpoint.step}/{total_steps}), and running the "
                       "stage again means training again")
    if reasons:
        lines.append(f"not resuming from {last}: {'; '.join(reasons)}; {then}")
        return None
    lines.append(f"resuming from {last} at step {checkpoint.step}/{total_steps} (its fingerprint matches "
                 "params.yaml, the shards, the tokenizer and the code)")
    return Start(checkpoint, optimizer=True, position=True)


def _start_from(path: Path, cfg: TrainConfig, fingerprint: Fingerprint, model_config: ModelConfig,
                total_steps: int, lines: list[str]) -> Start:
    """Start from train.resume: weights always, optimizer and position when compatible."""
    if not path.is_file():
        raise CheckpointError(f"train.resume = {path}: no such checkpoint; fix the path, or clear "
                              "train.resume to start fresh")
    checkpoint = TrainingCheckpoint.read(path)
    model_changes = dict_changes("model", checkpoint.model_config, dataclasses.asdict(model_config))
    if model_changes:
        raise CheckpointError(f"train.resume = {path}: its model differs from params.yaml "
                              f"({'; '.join(model_changes)}); match the model params or clear train.resume")
    if checkpoint.optimizer is None:
        lines.append(f"train.resume: loaded model weights from {path} (it holds no optimizer state this "
                     "code can use: a model file, or a RoPE checkpoint of format_version 1); "
                     "starting at step 0")
        return Start(checkpoint)
    old = Fingerprint.from_dict(checkpoint.fingerprint)
    old_optimizer = old.train.get("optimizer", "adamw")  # the only optimizer before train.optimizer
    if old_optimizer != cfg.optimizer:
        lines.append(f"train.resume: loaded model weights from {path}; its optimizer state is "
                     f"{old_optimizer}'s and train.optimizer is {cfg.optimizer}, so the optimizer starts "
                     "fresh at step 0")
        return Start(checkpoint)
    same_order = (old.shards_sha256 == fingerprint.shards_sha256
                  and old.train.get("batch_size") == cfg.batch_size and old.train.get("seed") == cfg.seed)
    position = same_order and checkpoint.step < total_steps
    if position:
        loaded = f"model weights, optimizer state, step {checkpoint.step} and RNG state"
    else:
        why = f"step {checkpoint.step} is already the last" if same_order else "the data order differs"
        loaded = f"model weights and optimizer state; starting at step 0 because {why}"
    changes = describe_changes(old, fingerprint)
    note = "; ".join(changes) if changes else "same params: this continues that run exactly"
    lines.append(f"train.resume: loaded {loaded} from {path} ({note})")
    return Start(checkpoint, optimizer=True, position=position)


def load_state(start: Start, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler) -> None:
    """Load the weights of `start`, and its optimizer and grad-scaler state when it says so.

    The optimizer keeps this run's hyper-parameters (weight decay, betas, peak rates), not the stored ones.
    """
    checkpoint = start.checkpoint
    if checkpoint is None:
        return
    load_weights(model, checkpoint.model, "checkpoint weights do not fit the model")
    if not start.optimizer:
        return
    current = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(checkpoint.optimizer)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint optimizer state does not fit the model: {exc}") from None
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)
    if scaler.is_enabled() and checkpoint.scaler:
        scaler.load_state_dict(checkpoint.scaler)

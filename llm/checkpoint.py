"""The cached deliverable `models/model.pt`: weights + model config + tokenizer hash.

Training checkpoints (`checkpoints/last.pt`, `best_model.pt`) hold more (optimizer,
RNG, data position) and are written by llm.train; this module owns the small,
stable format that `evaluate` and `llm generate` read.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from llm.config import ModelConfig
from llm.errors import CheckpointError
from llm.io import atomic_path

MODEL_FORMAT_VERSION = 1


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (no `module.`/`_orig_mod.` keys)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_model_file(path: str | os.PathLike, model: torch.nn.Module, config: ModelConfig,
                    tokenizer_sha256: str, extra: dict[str, Any] | None = None) -> None:
    """Write weights, config and tokenizer hash atomically (loadable with weights_only=True)."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    payload = {
        "format_version": MODEL_FORMAT_VERSION,
        "model": state,
        "model_config": dataclasses.asdict(config),
        "tokenizer_sha256": tokenizer_sha256,
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load a model file or training checkpoint safely, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; run `dvc repro` (or `dvc pull`) first")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); delete it and re-run training") from None
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no model / model_config)")
    return payload


def load_model_file(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the GPT from a model file or training checkpoint; returns (model in eval mode, payload)."""
    from llm.model import GPT

    payload = read_checkpoint(path, map_location="cpu")
    version = payload.get("format_version", MODEL_FORMAT_VERSION)
    if version > MODEL_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} is newer than this code "
                              f"({MODEL_FORMAT_VERSION}); upgrade the llm package")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    config = ModelConfig(**{k: v for k, v in payload["model_config"].items() if k in known})
    model = GPT(config)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the stored model config: "
                              f"{str(exc).splitlines()[0][:200]}") from None
    return model.to(device).eval(), payload


def save_training_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """torch.save a training checkpoint atomically; a failure names the path and keeps the old file."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: could not write the checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}); "
                              f"make {path.parent} a writable folder with free space; the previous "
                              f"checkpoint, if any, is intact") from None

"""The two file formats of a run: the deliverable `models/model.pt` and the training checkpoints.

`models/model.pt` holds weights, model config and tokenizer hash (plus the step, the final
metrics that do not depend on the machine, and the params): the small, stable format that
`evaluate` and `llm generate` read, byte-identical for identical runs. Training checkpoints
(`checkpoints/last.pt`, `best_model.pt`) are a model file plus everything an exact resume needs
(`TrainingCheckpoint`). Both load with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
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


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain module's weights on the CPU (no wrapper prefixes in the keys)."""
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def _save(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save through a temp file; via a file object, so the archive's inner folder is always
    `archive/` rather than the temp file's random name, and equal payloads give equal bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def save_model_file(path: str | os.PathLike, model: torch.nn.Module, config: ModelConfig,
                    tokenizer_sha256: str, extra: dict[str, Any] | None = None) -> None:
    """Write weights, config and tokenizer hash atomically (loadable with weights_only=True)."""
    _save({"format_version": MODEL_FORMAT_VERSION, "model": model_state(model),
           "model_config": dataclasses.asdict(config), "tokenizer_sha256": tokenizer_sha256, **(extra or {})},
          path)


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
        _save(payload, path)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: could not write the checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}); "
                              f"make {path.parent} a writable folder with free space; the previous "
                              f"checkpoint, if any, is intact") from None


@dataclass
class TrainingCheckpoint:
    """The layout of checkpoints/last.pt and best_model.pt: a model file plus what an exact resume needs.

    `rng` holds each process's torch RNG states (dropout), `progress` the run's running numbers
    (best_val_loss, train_time_s, latest metrics), `log` the TrainLog rows, `fingerprint` what the
    run depends on (llm.fingerprint) and `origin` the train.resume it started from ("" = scratch).
    A model file read with `from_payload` has no optimizer and empty resume fields.
    """

    model: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    tokenizer_sha256: str = ""
    step: int = 0
    epoch: int = 0
    position: int = 0
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] = field(default_factory=dict)
    rng: list[dict[str, torch.Tensor]] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    origin: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        """The dict torch.save writes (tensors shared, not copied)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"format_version": MODEL_FORMAT_VERSION, **values}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> TrainingCheckpoint:
        """A checkpoint from a payload of read_checkpoint (a model file gives weights and step only)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in payload.items() if key in known})

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically; a failure names the path and keeps the previous file."""
        save_training_checkpoint(path, self.to_payload())

    @classmethod
    def read(cls, path: str | os.PathLike) -> TrainingCheckpoint:
        """Read a training checkpoint or model file (CheckpointError when unreadable)."""
        return cls.from_payload(read_checkpoint(path))

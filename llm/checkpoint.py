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

from llm.config import ModelConfig, model_config_from_dict
from llm.errors import CheckpointError, ConfigError, one_line, shorten
from llm.io import atomic_path

MODEL_FORMAT_VERSION = 2  # 2: RoPE turns adjacent pairs (x[2i], x[2i + 1]); 1 turned (x[i], x[i + D/2])


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
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint; name the file in it "
                              "(e.g. models/model.pt or checkpoints/last.pt)")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; run `dvc repro` (or `dvc pull`) first")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated, empty or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({one_line(exc)}); delete it and "
                              "re-run training") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict) \
            or "model_config" not in payload:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no model / model_config); "
                              "delete it and re-run training")
    config, version = payload["model_config"], payload.get("format_version")
    rope = isinstance(config, dict) and config.get("position") == "rope"
    if type(version) is int and version == 1 and rope:  # not True, which == 1 too
        _pair_rope_dims(path, payload)
    return payload


def _pair_rope_dims(path: Path, payload: dict[str, Any]) -> None:
    """Upgrade a format 1 RoPE file in place: reorder each head's q and k rows of the QKV projection so
    that the pairs format 1 turned together, (i, i + D/2), sit side by side at (2i, 2i + 1), where format
    2 turns them by the same angles. Attention scores, and so the model's outputs, stay the same (up to
    rounding). Optimizer state, indexed by parameter and not by name, is dropped (the weights are kept)."""
    config = payload["model_config"]
    try:
        heads, head_size = config["num_heads"], config["d_model"] // config["num_heads"]
        half = torch.arange(head_size // 2)
        order = torch.stack((half, half + head_size // 2), dim=1).flatten()  # row 2i + j <- row i + j D/2
        for name, tensor in payload["model"].items():
            if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
                rows = tensor.unflatten(0, (3, heads, head_size)).clone()  # (3, H, D, ...)
                rows[:2] = rows[:2, :, order]
                payload["model"][name] = rows.flatten(0, 2)
    except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError,
            ZeroDivisionError) as exc:
        raise CheckpointError(f"{path}: a format_version 1 RoPE file whose QKV weights cannot be "
                              f"reordered ({one_line(exc)}); the file is corrupt: delete it and re-run "
                              "training") from None
    payload["format_version"] = 2
    payload["optimizer"] = None


def stored_model_config(path: str | os.PathLike, payload: dict[str, Any]) -> ModelConfig:
    """The ModelConfig a model file records, checked like params.yaml's `model` section (types and
    ranges), so that a corrupt or crafted file is one CheckpointError rather than a crash in GPT()."""
    version = payload.get("format_version", MODEL_FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: format_version {version!r} is not a version number; the file is "
                              "corrupt: delete it and re-run training")
    if version > MODEL_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} is newer than this code "
                              f"({MODEL_FORMAT_VERSION}); upgrade the llm package")
    try:
        return model_config_from_dict(payload["model_config"], source=str(path))
    except ConfigError as exc:
        raise CheckpointError(f"{exc}; the file is corrupt or not this project's: delete it and re-run "
                              "training") from None


def load_model_file(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the GPT from a model file or training checkpoint; returns (model in eval mode, payload)."""
    from llm.memory import check_weights_fit
    from llm.model import GPT

    payload = read_checkpoint(path, map_location="cpu")
    config = stored_model_config(path, payload)
    check_weights_fit(config, str(path))
    model = GPT(config)
    load_weights(model, payload["model"], f"{path}: its weights do not match its model config")
    return model.to(device).eval(), payload


def load_weights(model: torch.nn.Module, state: dict[str, Any], what: str) -> None:
    """model.load_state_dict(state), or CheckpointError `what: <every key and shape that differs>`."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as exc:
        header = f"Error(s) in loading state_dict for {type(model).__name__}:"  # what differs comes after
        raise CheckpointError(f"{what} ({shorten(str(exc).strip().removeprefix(header))}); "
                              "delete the file and re-run training") from None


def save_training_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """torch.save a training checkpoint atomically; a failure names the path and keeps the old file."""
    path = Path(path)
    try:
        _save(payload, path)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: could not write the checkpoint ({one_line(exc)}); "
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

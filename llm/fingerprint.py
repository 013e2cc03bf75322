"""What makes a resumed run equal to a fresh one: a fingerprint of params and inputs.

A training checkpoint may be continued only by a run that would have produced
it from scratch. That run is fixed by the `model` params (plus the vocabulary
size, from the shards), the `train` params that shape the optimisation, the
token shards (their meta.json) and the tokenizer. Excluded on purpose:

- `train.resume`: it says where to start, not what to compute (a run started
  from a checkpoint of the same params continues it exactly);
- `train.checkpoint_interval`: how often state is saved changes no number;
- the whole `runtime` section (device, precision, logging, ...): by design it
  changes nothing that DVC caches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from llm.config import ModelConfig, TrainConfig, section_dict

# train keys that do not change what a run computes (see the module docstring).
IGNORED_TRAIN_KEYS = ("resume", "checkpoint_interval")


def _digest(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """The four things a run depends on; `digest` combines them."""

    model: dict[str, Any]
    train: dict[str, Any]
    shards_sha256: str
    tokenizer_sha256: str

    @property
    def digest(self) -> str:
        """One hex string for the whole fingerprint."""
        return _digest(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, storable in a weights_only checkpoint."""
        return {"model": dict(self.model), "train": dict(self.train),
                "shards_sha256": self.shards_sha256, "tokenizer_sha256": self.tokenizer_sha256}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Fingerprint:
        """Inverse of to_dict (missing parts become empty, so they differ)."""
        return cls(model=dict(raw.get("model", {})), train=dict(raw.get("train", {})),
                   shards_sha256=str(raw.get("shards_sha256", "")),
                   tokenizer_sha256=str(raw.get("tokenizer_sha256", "")))


def make_fingerprint(model: ModelConfig, train: TrainConfig, shards_sha256: str,
                     tokenizer_sha256: str) -> Fingerprint:
    """Fingerprint of a run: model params, result-relevant train params, shards and tokenizer hashes."""
    train_dict = {k: v for k, v in section_dict(train).items() if k not in IGNORED_TRAIN_KEYS}
    return Fingerprint(section_dict(model), train_dict, shards_sha256, tokenizer_sha256)


def dict_changes(section: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'section.key old -> new' for every key whose value differs."""
    def shown(d: dict[str, Any], key: str) -> str:
        return repr(d[key]) if key in d else "(absent)"

    return [f"{section}.{key} {shown(old, key)} -> {shown(new, key)}"
            for key in sorted(set(old) | set(new)) if old.get(key, ...) != new.get(key, ...)]


def describe_changes(old: Fingerprint, new: Fingerprint) -> list[str]:
    """Human-readable list of what differs between a checkpoint's fingerprint and the current one."""
    changes = dict_changes("model", old.model, new.model) + dict_changes("train", old.train, new.train)
    if old.shards_sha256 != new.shards_sha256:
        changes.append("the token shards changed (data/shards/meta.json)")
    if old.tokenizer_sha256 != new.tokenizer_sha256:
        changes.append("the tokenizer changed")
    return changes

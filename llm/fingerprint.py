"""What makes a resumed run equal to a fresh one: a fingerprint of params, inputs and code.

A training checkpoint may be continued only by a run that would have produced
it from scratch. That run is fixed by the `model` params (plus the vocabulary
size, from the shards), the `train` params that shape the optimisation, the
token shards (their meta.json), the tokenizer, and the code of the train stage:
every Python file under the paths dvc.yaml lists as the train stage's deps (the
same files whose edit makes DVC re-run the stage). Excluded on purpose:

- `train.resume`: it says where to start, not what to compute (a run started
  from a checkpoint of the same params continues it exactly);
- `train.checkpoint_interval`: how often state is saved changes no number;
- the whole `runtime` section (device, precision, logging, ...): by design it
  changes nothing that DVC caches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llm.config import ModelConfig, TrainConfig, section_dict
from llm.io import sha256_file

# train keys that do not change what a run computes (see the module docstring).
IGNORED_TRAIN_KEYS = ("resume", "checkpoint_interval")
# The checkout this package was imported from: its dvc.yaml names the train stage's code.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRAIN_STAGE = "train"


def _digest(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def _python_files(path: Path) -> list[Path]:
    """`path` if it is a .py file, the .py files below it if it is a folder, else nothing."""
    if path.is_dir():
        return sorted(path.rglob("*.py"))
    return [path] if path.suffix == ".py" and path.is_file() else []


def code_hashes(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """{path relative to `root`: sha256} of every .py file under the train stage's deps in dvc.yaml.

    Without a dvc.yaml (an installed copy of llm, no project around it) the whole package counts.
    """
    dvc_yaml = root / "dvc.yaml"
    if dvc_yaml.is_file():
        deps = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"][TRAIN_STAGE]["deps"]
        tops = [root / dep for dep in deps]
    else:
        tops = [Path(__file__).resolve().parent]
    files = sorted({file for top in tops for file in _python_files(top)})
    return {file.relative_to(root).as_posix(): sha256_file(file) for file in files}


@dataclass(frozen=True)
class Fingerprint:
    """The things a run depends on; `digest` combines them."""

    model: dict[str, Any]
    train: dict[str, Any]
    shards_sha256: str
    tokenizer_sha256: str
    code: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """One hex string for the whole fingerprint."""
        return _digest(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, storable in a weights_only checkpoint."""
        return {"model": dict(self.model), "train": dict(self.train), "shards_sha256": self.shards_sha256,
                "tokenizer_sha256": self.tokenizer_sha256, "code": dict(self.code)}

    @classmethod
    def from_dict(cls, raw: Any) -> Fingerprint:
        """Inverse of to_dict (missing parts become empty, so they differ; so does a checkpoint of an older
        layout, whose `fingerprint` was a digest string)."""
        raw = raw if isinstance(raw, dict) else {}
        return cls(model=dict(raw.get("model", {})), train=dict(raw.get("train", {})),
                   shards_sha256=str(raw.get("shards_sha256", "")),
                   tokenizer_sha256=str(raw.get("tokenizer_sha256", "")), code=dict(raw.get("code", {})))


def make_fingerprint(model: ModelConfig, train: TrainConfig, shards_sha256: str, tokenizer_sha256: str,
                     code: dict[str, str] | None = None) -> Fingerprint:
    """Fingerprint of a run: model params, result-relevant train params, shards, tokenizer and code hashes."""
    train_dict = {k: v for k, v in section_dict(train).items() if k not in IGNORED_TRAIN_KEYS}
    return Fingerprint(section_dict(model), train_dict, shards_sha256, tokenizer_sha256, dict(code or {}))


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
    edited = sorted(path for path in old.code.keys() | new.code.keys()
                    if old.code.get(path) != new.code.get(path))
    if edited:
        shown = ", ".join(edited[:5]) + (f" and {len(edited) - 5} more" if len(edited) > 5 else "")
        changes.append(f"the code changed ({shown})")
    return changes

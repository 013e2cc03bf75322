"""Typed params.yaml: one dataclass per section, loaded and validated in one place.

The dataclass defaults below are the single source of truth for every default;
`params.yaml` and the README table are checked against them by a test.

Example::

    >>> params = load_params("params.yaml")          # doctest: +SKIP
    >>> params.model.d_model
    512

Every problem raises :class:`ConfigError` with one line naming the file, the
key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlsplit

import yaml

from llm.errors import ConfigError
from llm.io import utf8_error

WIKITEXT_DATASETS = ("wikitext-2-raw-v1", "wikitext-2-v1", "wikitext-103-raw-v1", "wikitext-103-v1")
DATASETS = WIKITEXT_DATASETS + ("text_files", "url")
SPLITS = ("train", "valid", "test")  # data/raw/<split>.txt, data/shards/<split>/, eval.splits
DEVICES = ("auto", "cuda", "mps", "cpu")  # runtime.device, `llm generate --device`
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # runtime.precision
SPECIAL_TOKENS_RULE = "must be distinct, non-empty strings"
# Upper bounds of sizes: far above any run this code is meant for, low enough that a typo (an extra
# zero or three) is one clear line here instead of an allocation failure or an hour of swapping.
MAX_SEED = 2**63 - 1          # torch.manual_seed takes at most 64-bit seeds
MAX_VOCAB = 1 << 20           # 1,048,576 ids (BPE ids live in str characters: at most 0x10FFFF)
MAX_WIDTH = 1 << 16           # model.d_model
MAX_TOKENS = 1 << 20          # context length, tokens generated per sample, sequences per batch


def special_tokens_valid(tokens: list) -> bool:
    """Special tokens must be distinct, non-empty strings: in params.yaml and in a tokenizer alike."""
    return all(isinstance(token, str) and token for token in tokens) and len(set(tokens)) == len(tokens)


def _knob(default: Any, *, choices: tuple | None = None, low: float | None = None,
          high: float | None = None, low_open: bool = False, doc: str = "") -> Any:
    """A dataclass field carrying its allowed values and a one-line meaning."""
    meta = {"choices": choices, "low": low, "high": high, "low_open": low_open, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """`data`: where the corpus comes from and how it is split (download stage)."""

    dataset: str = _knob("wikitext-2-raw-v1", choices=DATASETS,
                         doc="corpus: a WikiText release, `text_files` (local *.txt) or `url`")
    text_files_dir: str = _knob("", doc="folder of *.txt files when dataset is text_files")
    url: str = _knob("", doc="http(s) URL of a .txt/.zip/.gz/.tar.gz when dataset is url")
    sha256: str = _knob("", doc="expected sha256 of the download; empty = the pinned default, if any")
    members: list[str] = _knob([], doc="archive members to use as [train, valid, test] (url only)")
    val_fraction: float = _knob(0.1, low=0.0, high=0.5, low_open=True,
                                doc="share of text_files/url text held out for validation (the end)")
    test_fraction: float = _knob(0.1, low=0.0, high=0.5, low_open=True,
                                 doc="share held out for test (just before validation)")
    seed: int = _knob(1337, low=0, high=MAX_SEED, doc="seed of the by-file split of text_files")
    max_bytes: int = _knob(10**10, low=1, doc="largest download, and largest text after decompression, "
                           "in bytes (a guard against endless responses and archive bombs)")


@dataclass
class TokenizerConfig:
    """`tokenizer`: which tokenizer to fit on data/raw/train.txt (fit_tokenizer stage)."""

    tokenizer_type: str = _knob("bpe", choices=("bpe", "simple"), doc="byte-level BPE or word-level")
    vocab_size: int = _knob(10000, low=8, high=MAX_VOCAB, doc="vocabulary size, special tokens included")
    min_frequency: int = _knob(2, low=1, doc="a merge / word must occur at least this often")
    pattern: str = _knob("gpt4", doc="BPE pre-tokenization regex: `gpt2`, `gpt4` or a regex")
    special_tokens: list[str] = _knob(["<|endoftext|>"], doc="special tokens, never produced by merges")
    lowercase: bool = _knob(False, doc="simple tokenizer: lowercase the text first")
    split_punctuation: bool = _knob(False, doc="simple tokenizer: split punctuation from words")


@dataclass
class EncodeConfig:
    """`encode`: how token shards are written (encode stage)."""

    shard_tokens: int = _knob(16_777_216, low=1024, high=1 << 30, doc="maximum tokens per .npy shard")


@dataclass
class ModelConfig:
    """`model`: the GPT's shape. vocab_size comes from the tokenizer, not params.yaml."""

    vocab_size: int = _knob(10000, low=1, high=MAX_VOCAB, doc="set from the tokenizer by the train stage")
    model_type: str = _knob("gpt", choices=("gpt",), doc="model family")
    d_model: int = _knob(512, low=1, high=MAX_WIDTH, doc="embedding width")
    num_heads: int = _knob(8, low=1, high=1024, doc="attention heads (must divide d_model)")
    num_layers: int = _knob(6, low=1, high=1024, doc="transformer blocks")
    d_ff: int = _knob(2048, low=1, high=4 * MAX_WIDTH, doc="feed-forward hidden width")
    max_seq_length: int = _knob(512, low=2, high=MAX_TOKENS, doc="context length in tokens")
    dropout: float = _knob(0.1, low=0.0, high=1.0, doc="dropout probability")
    position: str = _knob("rope", choices=("learned", "sinusoidal", "rope"), doc="positional encoding")
    norm: str = _knob("layernorm", choices=("layernorm", "rmsnorm"), doc="normalisation layer")
    activation: str = _knob("relu2", choices=("gelu", "swiglu", "relu2"), doc="feed-forward activation")
    tie_weights: bool = _knob(True, doc="share token embedding and output layer weights")
    bias: bool = _knob(False, doc="bias terms in linear and norm layers")


@dataclass
class TrainConfig:
    """`train`: optimisation (train stage)."""

    batch_size: int = _knob(32, low=1, high=MAX_TOKENS, doc="sequences per optimizer step, summed over ranks")
    optimizer: str = _knob("muon", choices=("muon", "adamw"),
                           doc="muon: Muon on hidden matrices, AdamW on the rest; adamw: AdamW on all")
    learning_rate: float = _knob(3e-4, low=0.0, high=1.0, low_open=True,
                                 doc="peak learning rate (AdamW parameters)")
    muon_lr: float = _knob(0.02, low=0.0, high=1.0, low_open=True,
                           doc="peak learning rate of the hidden matrices (optimizer: muon)")
    min_lr: float = _knob(3e-5, low=0.0, high=1.0,
                          doc="learning rate at the end of cosine decay (muon_lr falls in proportion)")
    warmup_steps: int = _knob(100, low=0, doc="linear warmup steps")
    max_epochs: int = _knob(10, low=1, doc="passes over all training windows")
    max_steps: int = _knob(0, low=0, doc="stop after this many optimizer steps (0: run all epochs)")
    grad_accum_steps: int = _knob(1, low=1, doc="micro-batches per optimizer step")
    grad_clip: float = _knob(1.0, low=0.0, doc="max gradient norm (0: no clipping)")
    weight_decay: float = _knob(0.1, low=0.0, doc="decoupled weight decay on matrices (AdamW and Muon)")
    beta1: float = _knob(0.9, low=0.0, high=1.0, doc="AdamW beta1 (Muon's momentum is 0.95)")
    beta2: float = _knob(0.95, low=0.0, high=1.0, doc="AdamW beta2")
    eval_interval: int = _knob(500, low=1, doc="evaluate on validation every N steps")
    eval_batches: int = _knob(0, low=0, doc="validation batches per evaluation (0: whole split)")
    checkpoint_interval: int = _knob(500, low=1, doc="write checkpoints/last.pt every N steps")
    seed: int = _knob(1337, low=0, high=MAX_SEED, doc="seed of init, dropout and data order")
    resume: str = _knob("", doc="start from this checkpoint (e.g. checkpoints/best_model.pt)")


@dataclass
class EvalConfig:
    """`eval`: how the evaluate stage scores the model."""

    stride: int = _knob(0, low=0, doc="sliding-window stride in tokens (0: the context length)")
    batch_size: int = _knob(8, low=1, high=MAX_TOKENS, doc="windows per evaluation batch")
    splits: list[str] = _knob(["valid", "test"], doc="splits to evaluate")


@dataclass
class GenerateConfig:
    """`generate`: the samples stage's reports/samples.txt (and `llm generate` defaults)."""

    prompt: str = _knob("Once upon a time", doc="text to continue")
    max_length: int = _knob(100, low=1, high=MAX_TOKENS, doc="new tokens per sample")
    temperature: float = _knob(1.0, low=0.0, doc="sampling temperature (0: greedy)")
    top_k: int = _knob(0, low=0, doc="keep the k most likely tokens (0: all)")
    top_p: float = _knob(1.0, low=0.0, high=1.0, low_open=True, doc="nucleus sampling mass (1: off)")
    num_samples: int = _knob(3, low=1, high=10_000, doc="samples written to reports/samples.txt")
    seed: int = _knob(1337, low=0, high=MAX_SEED, doc="sampling seed")


@dataclass
class RuntimeConfig:
    """`runtime`: knobs that do not change results; no stage declares them."""

    device: str = _knob("auto", choices=DEVICES, doc="where to train and evaluate")
    precision: str = _knob("auto", choices=PRECISIONS,
                           doc="autocast precision; auto: bf16 on GPUs with it and on CPUs with native bf16 "
                               "(AMX, AVX512-BF16) from d_model 128, else fp32")
    threads: int = _knob(0, low=0, high=1024,
                         doc="CPU threads; 0 = auto: all cores from 10M parameters or 4M multiply-adds per "
                             "matmul (batch x context x d_model^2), else 1; set 1 on a shared machine")
    compile: bool = _knob(False, doc="torch.compile the model")
    num_workers: int = _knob(0, low=0, high=1024, doc="encode processes (0: all cores)")
    log_interval: int = _knob(10, low=1, doc="log training metrics every N steps")
    nproc_per_node: int = _knob(1, low=1, high=1024,
                                doc="training processes (GPUs) on this machine, via torchrun")
    progress: bool = _knob(True, doc="show progress bars")


@dataclass
class Params:
    """The whole params.yaml."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Params)}  # type: ignore[misc]
# Keys that exist on a dataclass but must not be set in params.yaml, with the reason.
DERIVED_KEYS = {("model", "vocab_size"): "it is taken from the tokenizer; set tokenizer.vocab_size instead"}


def _suggest(word: str, options: list[str]) -> str:
    """' (did you mean X?)' for the closest option, or ''."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value: Any, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, so that an error about a huge value stays a readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _name(key: Any) -> str:
    """A params.yaml key as written, or its repr when that would not print as one short line."""
    return key if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 40 else _show(key, 40)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, "a list of strings")


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:  # list[str]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        raise ConfigError(f"{where} = {_show(value)}: must be {_type_name(tp)}")
    if tp is float:
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where} = {_show(value)}: must be a finite number")
        value = number
    return value


def _check_range(where: str, value: Any, meta: dict) -> None:
    choices, low, high = meta.get("choices"), meta.get("low"), meta.get("high")
    if choices is not None and value not in choices:
        hint = _suggest(str(value), [str(c) for c in choices])
        raise ConfigError(f"{where} = {_show(value)}: must be one of {', '.join(choices)}{hint}")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        bound = f"> {low}" if meta.get("low_open") else f">= {low}"
        span = f" and <= {high}" if high is not None else ""
        raise ConfigError(f"{where} = {_show(value)}: must be {bound}{span}")
    if high is not None and value > high:
        raise ConfigError(f"{where} = {_show(value)}: must be <= {high}")


def build_section(cls: type, raw: Any, *, source: str = "params.yaml", section: str = "") -> Any:
    """Validate one mapping against dataclass `cls` and return the instance."""
    name = section or cls.__name__
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section {name!r} must be a mapping of key: value, got {_show(raw)}")
    known = [f.name for f in fields(cls)]
    values = {}
    for key, value in raw.items():
        where = f"{source}: {name}.{_name(key)}"
        if key not in known:
            settable = [k for k in known if (section, k) not in DERIVED_KEYS]
            raise ConfigError(f"{where}: unknown key{_suggest(str(key), settable)}; "
                              f"allowed keys: {', '.join(settable)}")
        if (section, key) in DERIVED_KEYS:
            raise ConfigError(f"{where}: not a params.yaml key: {DERIVED_KEYS[(section, key)]}")
        values[key] = check_value(cls, key, value, where)
    return cls(**values)


def check_value(cls: type, key: str, value: Any, where: str) -> Any:
    """`value` checked against the type and allowed values of field `key` of the section dataclass `cls`
    (ints are accepted where floats are); ConfigError names `where` (a params.yaml key, a CLI flag)."""
    spec = next(f for f in fields(cls) if f.name == key)
    value = _coerce(where, value, get_type_hints(cls)[key])
    _check_range(where, value, dict(spec.metadata))
    return value


def _check_consistency(p: Params, source: str) -> None:
    """Cross-key rules that no single field can express."""
    def fail(key: str, value: Any, why: str) -> None:
        raise ConfigError(f"{source}: {key} = {_show(value)}: {why}")

    m, t, d = p.model, p.train, p.data
    check_model_config(m, source)
    if t.min_lr > t.learning_rate:
        fail("train.min_lr", t.min_lr, f"must be <= train.learning_rate ({t.learning_rate})")
    if t.batch_size % t.grad_accum_steps:
        fail("train.grad_accum_steps", t.grad_accum_steps,
             f"must divide train.batch_size ({t.batch_size})")
    if d.val_fraction + d.test_fraction >= 1.0:
        fail("data.val_fraction", d.val_fraction,
             f"val_fraction + test_fraction ({d.test_fraction}) must be < 1 to leave training text")
    if d.dataset == "text_files" and not d.text_files_dir:
        fail("data.text_files_dir", d.text_files_dir,
             "must name a folder of *.txt files when data.dataset is text_files")
    if d.dataset == "url" and _url_problem(d.url):
        fail("data.url", d.url, _url_problem(d.url))
    if d.members and len(d.members) != 3:
        fail("data.members", d.members, "must list exactly 3 archive members: [train, valid, test]")
    if d.sha256 and (len(d.sha256) != 64 or any(c not in "0123456789abcdef" for c in d.sha256.lower())):
        fail("data.sha256", d.sha256, "must be 64 hex digits (or empty)")
    tk = p.tokenizer
    if tk.tokenizer_type == "bpe" and tk.vocab_size < 256 + len(tk.special_tokens):
        fail("tokenizer.vocab_size", tk.vocab_size, f"a byte-level BPE needs at least 256 + "
             f"{len(tk.special_tokens)} special tokens = {256 + len(tk.special_tokens)}")
    if not special_tokens_valid(tk.special_tokens):
        fail("tokenizer.special_tokens", tk.special_tokens, SPECIAL_TOKENS_RULE)
    if p.eval.stride > m.max_seq_length:
        fail("eval.stride", p.eval.stride, f"must be <= model.max_seq_length ({m.max_seq_length}); "
             "0 means non-overlapping windows")
    for split in p.eval.splits:
        if split not in SPLITS:
            fail("eval.splits", p.eval.splits, f"{split!r} is not a split; use {', '.join(SPLITS)}")


def _url_problem(url: str) -> str:
    """What is wrong with data.url as a download address, or ''."""
    if not url.startswith(("http://", "https://")):
        return "must be an http(s) URL when data.dataset is url"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsing the port is the check: 'http://h:x/' raises here)
    except ValueError as exc:
        return f"not a valid URL ({exc}); check its brackets, host and port"
    if not parts.hostname:
        return "names no host; write it as http(s)://host/path"
    return ""


def check_model_config(m: ModelConfig, source: str = "params.yaml") -> None:
    """Rules a GPT shape must satisfy: field choices and ranges, heads dividing d_model, even RoPE head size.

    Used by load_params and by GPT itself, since a ModelConfig may be built in code.
    """
    for spec in fields(m):
        _check_range(f"{source}: model.{spec.name}", getattr(m, spec.name), dict(spec.metadata))
    if m.d_model % m.num_heads:
        divisors = [h for h in range(1, m.d_model + 1) if m.d_model % h == 0 and h <= 64]
        raise ConfigError(f"{source}: model.num_heads = {m.num_heads!r}: must divide model.d_model "
                          f"({m.d_model}); choose one of {', '.join(map(str, divisors))}")
    if m.position == "rope" and (m.d_model // m.num_heads) % 2:
        raise ConfigError(f"{source}: model.position = 'rope': needs an even head size, got d_model/num_heads"
                          f" = {m.d_model // m.num_heads}; change num_heads or use position: learned")


def model_config_from_dict(raw: Any, *, source: str) -> ModelConfig:
    """The ModelConfig stored in a model file (vocab_size included; unknown keys of newer code ignored),
    checked field by field like params.yaml's `model` section; ConfigError names `source`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: model_config = {_show(raw)}: must be a mapping of key: value")
    known = {spec.name for spec in fields(ModelConfig)}
    config = build_section(ModelConfig, {k: v for k, v in raw.items() if k in known}, source=source,
                           section="model_config")
    check_model_config(config, source)
    return config


def params_from_dict(raw: Any, *, source: str = "params.yaml") -> Params:
    """Validate a parsed params.yaml mapping; missing sections and keys take defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping of sections, got {type(raw).__name__}")
    built = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            raise ConfigError(f"{source}: {_name(key)}: unknown section{_suggest(str(key), list(SECTIONS))}; "
                              f"allowed sections: {', '.join(SECTIONS)}")
        built[key] = build_section(SECTIONS[key], value, source=source, section=key)
    params = Params(**built)
    _check_consistency(params, source)
    return params


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `2e-05` as a float (YAML 1.2; `dvc exp run -S` writes such values)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def load_params(path: str | os.PathLike = "params.yaml", *, sections: tuple[str, ...] = ()) -> Params:
    """Read and validate params.yaml (a missing file is an error: the stages need it).

    `sections` are the ones the calling stage declares in dvc.yaml: each must be present, as `dvc repro`
    refuses to run the stage without it, so that the script run by hand and DVC agree.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the project root (where params.yaml is)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(utf8_error(str(path), exc))) from None
    except OSError as exc:  # a folder, no permission
        raise ConfigError(f"{path}: cannot be read ({exc.strerror}); it must be a readable YAML file"
                          ) from None
    try:
        raw = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be params.yaml") from None
    params = params_from_dict(raw, source=str(path))
    for name in sections:
        if name not in (raw or {}):
            raise ConfigError(f"{path}: section {name!r} is missing; this stage reads it and `dvc repro` "
                              f"stops without it: add `{name}:` (keys left out take their defaults)")
    return params


def section_dict(section: Any) -> dict[str, Any]:
    """A section as a plain dict (for fingerprints, metadata and logs)."""
    return dataclasses.asdict(section)

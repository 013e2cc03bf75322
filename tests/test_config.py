"""params.yaml validation: every bad value gets one line naming file, key, value and what is allowed."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm.config import SECTIONS, Params, load_params, params_from_dict, section_dict
from llm.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]

INVALID = [
    ("unknown section", {"modle": {}},
     "params.yaml: modle: unknown section (did you mean 'model'?); allowed sections: data, tokenizer"),
    ("unknown key", {"train": {"learnig_rate": 0.1}},
     "params.yaml: train.learnig_rate: unknown key (did you mean 'learning_rate'?); allowed keys: batch"),
    ("unknown model key lists only settable keys", {"model": {"positon": "rope"}},
     "params.yaml: model.positon: unknown key (did you mean 'position'?); allowed keys: model_type, d_model"),
    ("string for int", {"model": {"d_model": "512"}},
     "params.yaml: model.d_model = '512': must be an integer"),
    ("bool for int", {"train": {"batch_size": True}},
     "params.yaml: train.batch_size = True: must be an integer"),
    ("list for str", {"tokenizer": {"pattern": ["gpt2"]}},
     "params.yaml: tokenizer.pattern = ['gpt2']: must be a string"),
    ("str for list", {"eval": {"splits": "valid"}}, "eval.splits = 'valid': must be a list of strings"),
    ("not finite", {"train": {"learning_rate": float("nan")}}, "train.learning_rate = nan: must be a finite"),
    ("int beyond floats", {"train": {"beta1": 10**400}}, "train.beta1 = 1000000000000000000000000000000000"),
    ("huge value cut short", {"model": {"norm": "x" * 10_000}}, "model.norm = 'xxxxxxxx"),
    ("seed beyond 64 bits", {"generate": {"seed": 2**70}},
     "params.yaml: generate.seed = 1180591620717411303424: must be <= 9223372036854775807"),
    ("max_length beyond any context", {"generate": {"max_length": 10**11}},
     "params.yaml: generate.max_length = 100000000000: must be <= 1048576"),
    ("key with a newline", {"train": {"a\nb": 1}}, "params.yaml: train.'a\\nb': unknown key"),
    ("negative lr", {"train": {"learning_rate": -0.001}},
     "params.yaml: train.learning_rate = -0.001: must be > 0.0 and <= 1.0"),
    ("dropout > 1", {"model": {"dropout": 1.5}}, "params.yaml: model.dropout = 1.5: must be <= 1.0"),
    ("vocab 0", {"tokenizer": {"vocab_size": 0}}, "params.yaml: tokenizer.vocab_size = 0: must be >= 8"),
    ("bad choice", {"model": {"position": "rop"}},
     "params.yaml: model.position = 'rop': must be one of learned, sinusoidal, rope (did you mean 'rope'?)"),
    ("bad dataset", {"data": {"dataset": "wikitext2"}},
     "params.yaml: data.dataset = 'wikitext2': must be one of wikitext-2-raw-v1, wikitext-2-v1,"),
    ("heads do not divide", {"model": {"d_model": 100, "num_heads": 8}},
     "params.yaml: model.num_heads = 8: must divide model.d_model (100); choose one of 1, 2, 4, 5, 10, 20"),
    ("rope odd head size", {"model": {"d_model": 24, "num_heads": 8}},
     "params.yaml: model.position = 'rope': needs an even head size, got d_model/num_heads = 3"),
    ("min_lr > lr", {"train": {"learning_rate": 1e-4, "min_lr": 1e-3}},
     "params.yaml: train.min_lr = 0.001: must be <= train.learning_rate (0.0001)"),
    ("grad accum", {"train": {"batch_size": 32, "grad_accum_steps": 5}},
     "params.yaml: train.grad_accum_steps = 5: must divide train.batch_size (32)"),
    ("val+test >= 1", {"data": {"val_fraction": 0.5, "test_fraction": 0.5}},
     "params.yaml: data.val_fraction = 0.5: val_fraction + test_fraction (0.5) must be < 1"),
    ("fraction range", {"data": {"val_fraction": 0.0}}, "data.val_fraction = 0.0: must be > 0.0 and <= 0.5"),
    ("text_files without dir", {"data": {"dataset": "text_files"}},
     "params.yaml: data.text_files_dir = '': must name a folder of *.txt files when data.dataset is"),
    ("url without http", {"data": {"dataset": "url", "url": "ftp://example.org/a.txt"}},
     "params.yaml: data.url = 'ftp://example.org/a.txt': must be an http(s) URL when data.dataset is url"),
    ("url without a host", {"data": {"dataset": "url", "url": "http://"}},
     "params.yaml: data.url = 'http://': names no host; write it as http(s)://host/path"),
    ("url with a broken IPv6 host", {"data": {"dataset": "url", "url": "http://[::1"}},
     "params.yaml: data.url = 'http://[::1': not a valid URL (Invalid IPv6 URL); check its brackets"),
    ("url with a bad port", {"data": {"dataset": "url", "url": "https://example.org:http/a.txt"}},
     "data.url = 'https://example.org:http/a.txt': not a valid URL (Port could not be cast"),
    ("bad sha256", {"data": {"sha256": "abc123"}},
     "params.yaml: data.sha256 = 'abc123': must be 64 hex digits"),
    ("two members", {"data": {"members": ["a", "b"]}}, "data.members = ['a', 'b']: must list exactly 3"),
    ("bpe vocab < 257", {"tokenizer": {"vocab_size": 256}},
     "params.yaml: tokenizer.vocab_size = 256: a byte-level BPE needs at least 256 + 1 special tokens = 257"),
    ("duplicate specials", {"tokenizer": {"special_tokens": ["<s>", "<s>"]}},
     "params.yaml: tokenizer.special_tokens = ['<s>', '<s>']: must be distinct, non-empty strings"),
    ("stride > seq", {"model": {"max_seq_length": 64}, "eval": {"stride": 65}},
     "params.yaml: eval.stride = 65: must be <= model.max_seq_length (64)"),
    ("unknown eval split", {"eval": {"splits": ["valid", "dev"]}},
     "params.yaml: eval.splits = ['valid', 'dev']: 'dev' is not a split; use train, valid, test"),
    ("vocab_size in params", {"model": {"vocab_size": 5000}},
     "params.yaml: model.vocab_size: not a params.yaml key: it is taken from the tokenizer"),
    ("section not a mapping", {"train": [1, 2]}, "params.yaml: section 'train' must be a mapping"),
    ("top level not a mapping", ["data"], "params.yaml: must be a mapping of sections, got list"),
]


@pytest.mark.parametrize(("raw", "message"), [case[1:] for case in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_config_is_one_clear_line(raw, message):
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text and len(text) < 400


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  dataset: text_files\ntrain:\n  batch_size: [1, 2\n  seed: 3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not valid YAML at line \d+"):
        load_params(path)


def test_missing_file_says_where_to_run(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml: not found; run from the project root"):
        load_params(tmp_path / "params.yaml")


def test_errors_name_the_file_they_came_from(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  norm: batchnorm\n")
    expected = rf"^{re.escape(str(path))}: model.norm = 'batchnorm': must be one of layernorm, rmsnorm$"
    with pytest.raises(ConfigError, match=expected):
        load_params(path)


def test_partial_params_take_the_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  d_model: 64\n  num_heads: 4\ntrain:\n  learning_rate: 0.01\neval:\n")
    params = load_params(path)
    assert params.model.d_model == 64 and params.model.num_heads == 4
    assert params.train.learning_rate == 0.01 and params.train.batch_size == Params().train.batch_size
    assert params.eval == Params().eval and params.data == Params().data
    assert load_params(_write(tmp_path / "empty.yaml", "")) == Params()


def test_ints_are_accepted_for_floats_and_exponents_without_a_dot_parse(tmp_path):
    """`dvc exp run -S train.min_lr=2e-5` writes `min_lr: 2e-05`, which YAML 1.1 would read as a string."""
    params = load_params(_write(tmp_path / "p.yaml", "train:\n  learning_rate: 1\n  min_lr: 2e-05\n"))
    assert params.train.learning_rate == 1.0 and isinstance(params.train.learning_rate, float)
    assert params.train.min_lr == 2e-5


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_params_yaml_not_utf8_or_a_folder_is_one_line(tmp_path):
    latin1 = _write(tmp_path / "params.yaml", "")
    latin1.write_bytes(b"generate:\n  prompt: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not valid UTF-8 at byte 23 \(bad byte 0xe9\); conv"):
        load_params(latin1)
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"folder.yaml: cannot be read \(Is a directory\)"):
        load_params(tmp_path / "folder.yaml")


def test_a_stage_names_the_declared_section_that_is_missing(tmp_path):
    path = _write(tmp_path / "params.yaml", "model:\n  d_model: 64\n  num_heads: 4\n")
    assert load_params(path, sections=("model",)).model.d_model == 64
    with pytest.raises(ConfigError, match=r"params.yaml: section 'train' is missing; this stage reads it"):
        load_params(path, sections=("model", "train"))
    with pytest.raises(ConfigError, match="section 'eval' is missing"):
        load_params(_write(tmp_path / "empty.yaml", ""), sections=("eval",))


# Values of every kind a hand edit or `dvc exp run -S` can put in a key: wrong types, huge and negative
# numbers, NaN and infinities, odd strings, lists and mappings.
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(),
    st.sampled_from([-1, 0, 1, 2**31, 2**63, 2**64, 2**70, 10**12, 10**400, -(10**400)]),
    st.floats(), st.sampled_from([float("nan"), float("inf"), -0.0, 1e-320, 1e308]),
    st.text(max_size=20),
    st.sampled_from(["", " ", "\n", "\x00", "é", "🎉" * 200, "http://", "http://[::1", "ftp://x/y", "1e5",
                     ".nan", "gpt4", "rope", "cpu", "[s", "(?", "x*", "~", "yes"]),
    st.lists(st.one_of(st.text(max_size=4), st.integers(), st.none()), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
KEYS = [(section, spec.name) for section, cls in SECTIONS.items() for spec in fields(cls)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(KEYS), ODD_VALUES, min_size=1, max_size=3),
       whole_section=st.one_of(st.none(), st.tuples(st.sampled_from(list(SECTIONS)), ODD_VALUES)))
def test_any_value_in_any_key_loads_or_is_one_config_error_line(tmp_path, changes, whole_section):
    """Loading succeeds or raises ConfigError, one line that names the file: never another exception."""
    raw = {name: section_dict(cls()) for name, cls in SECTIONS.items()}
    for (section, key), value in changes.items():
        raw[section][key] = value
    if whole_section is not None:
        raw[whole_section[0]] = whole_section[1]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    try:
        params = load_params(path, sections=tuple(SECTIONS))
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 1000, message
    else:
        assert isinstance(params, Params)

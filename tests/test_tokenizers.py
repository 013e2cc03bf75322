"""The tokenizer interface, the word-level tokenizer, tokenizer files, and the fit_tokenizer stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from llm.config import TokenizerConfig
from llm.errors import TokenizerError
from llm.tokenizers import (
    TOKENIZER_TYPES,
    BPETokenizer,
    SimpleTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wiki_text(wikitext_valid) -> str:
    return wikitext_valid.read_text(encoding="utf-8")


def test_simple_reproduces_the_wikitext_word_vocabulary(wiki_text):
    words = wiki_text.split()
    distinct = set(words) - {"<unk>"}  # the tokenized release's own <unk> is our <unk> token
    with pytest.warns(UserWarning, match="only"):
        tok = SimpleTokenizer.train(wiki_text, vocab_size=100_000)
    assert tok.vocab_size == len(distinct) + 4  # + <pad>, <unk>, <eol>, <|endoftext|>
    assert set(tok.vocab[4:]) == distinct
    ids = tok.encode(wiki_text)
    assert len(ids) == len(words) + wiki_text.count("\n") == 213_886 + 3_760  # the papers' token count
    assert ids.count(tok.unk_id) == words.count("<unk>")
    assert ids.count(tok.eol_id) == 3_760
    assert tok.decode(ids) == "\n".join(" ".join(line.split()) for line in wiki_text.split("\n"))


def test_simple_vocab_is_most_frequent_with_deterministic_ties(wiki_text):
    tok = SimpleTokenizer.train(wiki_text, vocab_size=1004)
    counts: dict[str, int] = {}
    for w in wiki_text.split():
        counts[w] = counts.get(w, 0) + 1
    counts.pop("<unk>")
    expected = sorted(counts, key=lambda w: (-counts[w], w))[:1000]
    assert tok.vocab[4:] == expected
    assert tok.vocab[4] == "the"


@pytest.mark.filterwarnings("ignore:SimpleTokenizer. only")
def test_simple_options_and_min_frequency():
    text = "The cat, the CAT; the dog."
    tok = SimpleTokenizer.train(text, vocab_size=20, lowercase=True, split_punctuation=True, min_frequency=2)
    assert tok.vocab[4:] == ["the", "cat"]
    assert tok.encode("THE Cat, bird") == [4, 5, tok.unk_id, tok.unk_id]
    plain = SimpleTokenizer.train(text, vocab_size=20)
    assert "cat," in plain.vocab and "the" in plain.vocab and "The" in plain.vocab


@pytest.mark.filterwarnings("ignore:SimpleTokenizer. only")
def test_simple_specials_and_roundtrip(tmp_path):
    tok = SimpleTokenizer.train("a b c a b a", vocab_size=10, special_tokens=["<|endoftext|>", "<sep>"])
    assert tok.special_tokens == {"<pad>": 0, "<unk>": 1, "<eol>": 2, "<|endoftext|>": 3, "<sep>": 4}
    assert tok.eot_id == 3 and tok.pad_id == 0 and tok.eol_id == 2
    assert tok.encode("a <|endoftext|> b") == [5, 1, 6]
    assert tok.encode("a <|endoftext|> b", allowed_special="all") == [5, 3, 6]
    assert tok.encode("a<sep>b", allowed_special={"<sep>"}) == [5, 4, 6]
    tok.save(tmp_path / "s.json")
    back = load_tokenizer(tmp_path / "s.json")
    assert isinstance(back, SimpleTokenizer) and back.to_dict() == tok.to_dict()
    assert back.encode_batch(["a b", "c zz"]) == [[5, 6], [7, 1]]
    with pytest.raises(TokenizerError, match="id 99 is out of range"):
        tok.decode([99])
    with pytest.raises(TokenizerError, match="id -1 is out of range"):
        tok.decode([-1])


# Text of words, spaces, tabs and newlines (and the odd other whitespace, such as \r or \u2028).
word_lines = st.text(st.sampled_from("ab \t\n\r\u2028\u00e9"), max_size=60)


@given(word_lines)
def test_simple_decode_keeps_line_breaks_and_counts_words_plus_lines(text):
    tok = SimpleTokenizer(sorted(set(text.split())))
    ids = tok.encode(text)
    assert len(ids) == len(text.split()) + text.count("\n")
    assert tok.decode(ids) == "\n".join(" ".join(tok.words(line)) for line in text.split("\n"))


def test_simple_continuation_reads_after_the_prompt():
    tok = SimpleTokenizer.train("once upon a time there was a cat", vocab_size=11)
    prompt, continuation = tok.encode("once upon a time"), tok.encode("there was\na cat")
    assert tok.decode_after(prompt, continuation) == " there was\na cat"
    assert tok.decode_after(prompt + [tok.eol_id], continuation) == "there was\na cat"


@pytest.mark.filterwarnings("ignore:SimpleTokenizer. only")
def test_simple_version_1_files_still_load_with_their_ids(tmp_path):
    """A file written before <eol> existed: same ids as then, newlines read as spaces, saved as version 1."""
    old = {"type": "simple", "version": 1, "vocab_size": 6, "lowercase": False, "split_punctuation": False,
           "special_tokens": {"<pad>": 0, "<unk>": 1, "<|endoftext|>": 2}, "words": ["a", "b", "c"]}
    (tmp_path / "old.json").write_text(json.dumps(old), encoding="utf-8")
    tok = load_tokenizer(tmp_path / "old.json")
    assert tok.eol_id is None and tok.eot_id == 2
    assert tok.encode("a b\nc zz") == [3, 4, 5, 1] and tok.decode([3, 4, 5]) == "a b c"
    assert tok.to_dict() == old
    (tmp_path / "new.json").write_text(json.dumps({**old, "version": 3}), encoding="utf-8")
    with pytest.raises(TokenizerError, match="simple tokenizer file version 3 is newer than this code reads"):
        load_tokenizer(tmp_path / "new.json")


def test_simple_bad_arguments():
    with pytest.raises(TokenizerError, match="vocab_size = 3"):
        SimpleTokenizer.train("a b", vocab_size=3)
    with pytest.raises(TokenizerError, match="empty"):
        SimpleTokenizer.train(["", ""], vocab_size=10)
    with pytest.raises(TokenizerError, match="min_frequency"):
        SimpleTokenizer.train("a", vocab_size=10, min_frequency=0)


def test_train_tokenizer_dispatches_and_rejects_unknown_types():
    assert isinstance(train_tokenizer("simple", "a b", 5), SimpleTokenizer)
    assert isinstance(train_tokenizer("bpe", "ab ab ab", 258), BPETokenizer)
    with pytest.raises(TokenizerError, match="tokenizer_type = 'wordpiece': unknown"):
        train_tokenizer("wordpiece", "a b", 100)


def test_params_offer_exactly_the_registered_tokenizer_types():
    choices = TokenizerConfig.__dataclass_fields__["tokenizer_type"].metadata["choices"]
    assert sorted(choices) == sorted(TOKENIZER_TYPES) == ["bpe", "simple"]


def test_both_tokenizers_implement_the_interface():
    for tok in (SimpleTokenizer.train("x y", 5), BPETokenizer.train("x y x y", 258)):
        assert isinstance(tok, Tokenizer)
        assert isinstance(tok.vocab_size, int) and tok.eot_id == tok.special_tokens["<|endoftext|>"]
        assert tok.to_dict()["type"] == tok.kind and tok.to_dict()["version"] == tok.version


@pytest.fixture()
def saved_bpe(tmp_path) -> Path:
    path = tmp_path / "tokenizer.json"
    BPETokenizer.train("hello world hello there", 260, min_frequency=1).save(path)
    return path


def _rewrite(path: Path, **changes) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    path.write_text(json.dumps(doc), encoding="utf-8")


@pytest.mark.parametrize(("change", "message"), [
    ({"version": 2}, "version 2 is newer"),
    ({"version": 0}, "version 0 is not valid"),
    ({"type": "wordpiece"}, "unknown tokenizer type 'wordpiece'"),
    ({"type": None}, "lacks the field 'type'"),
    ({"merges": None}, "lacks the field 'merges'"),
    ({"merges": [[1, 2, 3]]}, "list of \\[id, id\\] pairs"),
    ({"merges": [[1, 9999]]}, "not yet defined"),
    ({"vocab_size": 7}, "do not match"),
    ({"pattern": "(oops"}, "not a valid regex"),
    ({"special_tokens": ["<|endoftext|>"]}, "wrong type"),
])
def test_corrupt_tokenizer_files_raise_clear_errors(saved_bpe, change, message):
    _rewrite(saved_bpe, **change)
    with pytest.raises(TokenizerError, match=message) as info:
        load_tokenizer(saved_bpe)
    assert str(saved_bpe) in str(info.value)


def test_missing_and_non_json_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerError, match="JSON object"):
        load_tokenizer(tmp_path / "list.json")


def test_load_of_the_wrong_class(saved_bpe):
    with pytest.raises(TokenizerError, match="holds a 'bpe' tokenizer"):
        SimpleTokenizer.load(saved_bpe)


def _run_stage(workdir: Path, tokenizer: dict, text: str | None) -> subprocess.CompletedProcess:
    (workdir / "params.yaml").write_text(yaml.safe_dump({"tokenizer": tokenizer,
                                                         "runtime": {"progress": False}}), encoding="utf-8")
    if text is not None:
        (workdir / "data" / "raw").mkdir(parents=True, exist_ok=True)
        (workdir / "data" / "raw" / "train.txt").write_text(text, encoding="utf-8")
    return subprocess.run([sys.executable, str(ROOT / "stages" / "fit_tokenizer.py")], cwd=workdir,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_stage_fits_bpe_and_simple(tmp_path, shakespeare):
    text = shakespeare.read_text(encoding="utf-8")[:200_000]
    run = _run_stage(tmp_path, {"tokenizer_type": "bpe", "vocab_size": 600}, text)
    assert run.returncode == 0, run.stderr
    assert "vocab_size 600" in run.stdout
    tok = load_tokenizer(tmp_path / "data" / "tokenizer.json")
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 600 and tok.decode(tok.encode(text)) == text
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw", "tokenizer.json"]  # no temp files
    run = _run_stage(tmp_path, {"tokenizer_type": "simple", "vocab_size": 500, "lowercase": True}, None)
    assert run.returncode == 0, run.stderr
    tok = load_tokenizer(tmp_path / "data" / "tokenizer.json")
    assert isinstance(tok, SimpleTokenizer) and tok.vocab_size == 500 and tok.lowercase


def test_stage_stops_early_and_records_the_size(tmp_path):
    run = _run_stage(tmp_path, {"vocab_size": 5000}, "tiny text, tiny text")
    assert run.returncode == 0, run.stderr
    assert "stopped at vocab_size" in run.stderr
    size = json.loads((tmp_path / "data" / "tokenizer.json").read_text(encoding="utf-8"))["vocab_size"]
    assert size < 5000 and f"vocab_size {size} (asked 5000)" in run.stdout


@pytest.mark.parametrize(("tokenizer", "text", "message"), [
    ({}, None, "train.txt: not found"),
    ({}, " \n ", "train.txt: is empty"),
    ({"vocab_size": 200}, "abc", "tokenizer.vocab_size = 200"),
    ({"tokenizer_type": "wordpiece"}, "abc", "tokenizer.tokenizer_type = 'wordpiece'"),
    ({"pattern": "gpt5"}, "abc", "unknown pattern name"),
])
def test_stage_bad_inputs_fail_with_one_line(tmp_path, tokenizer, text, message):
    run = _run_stage(tmp_path, tokenizer, text)
    assert run.returncode == 2
    assert message in run.stderr and run.stderr.startswith("error: ") and "Traceback" not in run.stderr
    assert not (tmp_path / "data" / "tokenizer.json").exists()

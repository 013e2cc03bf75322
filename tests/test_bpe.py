"""Byte-level BPE: training against a naive reference, the fast encoder against the plain merge loop,
losslessness, and exact tiktoken parity."""

from __future__ import annotations

import collections
import doctest
import json

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llm.tokenizers._bpe_encode as fast
import llm.tokenizers.bpe
from llm.config import TokenizerConfig
from llm.errors import TokenizerError
from llm.tokenizers import BPETokenizer, load_tokenizer
from llm.tokenizers._bpe_train import count_words, learn_merges
from llm.tokenizers.bpe import merge
from llm.tokenizers.patterns import GPT2_PATTERN, GPT4_PATTERN, make_splitter

# Characters that stress the pre-tokenization rules: every kind of whitespace (incl. ones Python and
# Unicode disagree on), letters and digits of several scripts, marks, emoji with joiners, apostrophes.
TRICKY = list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2000\u2028\u3000aZz\u00e9\u00df1\u0663\u00bd'.,!?-_@<|>"
              "\u4e2d\u6587\u0928\u093f\u0301\U0001F600\u200d\U0001F469\uFE0F\u0416sdmtlvre")
tricky_text = st.text(alphabet=st.sampled_from(TRICKY), max_size=80)
any_text = st.text(max_size=80)  # hypothesis never draws lone surrogates here: valid Unicode only


def naive_merges(words: collections.Counter, num_merges: int, min_frequency: int) -> list[tuple[int, int]]:
    """Textbook BPE: recount every pair each round, best = (count desc, left bytes, right bytes)."""
    seqs = {tuple(w.encode("utf-8")): c for w, c in words.items()}
    token_bytes = [bytes([i]) for i in range(256)]
    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges:
        pairs: collections.Counter = collections.Counter()
        for seq, count in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += count
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], token_bytes[p[0]], token_bytes[p[1]]))
        if pairs[(a, b)] < min_frequency:
            break
        merged = token_bytes[a] + token_bytes[b]
        if merged in token_bytes:
            new = token_bytes.index(merged)
        else:
            new = len(token_bytes)
            token_bytes.append(merged)
            merges.append((a, b))
        rewritten: collections.Counter = collections.Counter()
        for seq, count in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            rewritten[tuple(out)] += count
        seqs = rewritten
    return merges


def tiktoken_of(tok: BPETokenizer) -> tiktoken.Encoding:
    return tiktoken.Encoding(name="ours", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks(),
                             special_tokens=tok.special_tokens)


@pytest.fixture(scope="module")
def shakespeare_text(shakespeare) -> str:
    return shakespeare.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok(shakespeare_text: str) -> BPETokenizer:
    return BPETokenizer.train(shakespeare_text, vocab_size=1024)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2", "gpt4"])
def test_word_counts_equal_plain_findall_on_real_corpora(shared_data, pattern):
    for path in sorted(shared_data.rglob("*.txt")):
        text = path.read_text(encoding="utf-8")
        assert count_words([text], pattern) == collections.Counter(regex.findall(pattern, text)), path


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.one_of(tricky_text, any_text), max_size=4))
def test_word_counts_equal_plain_findall_on_generated_text(texts):
    expected = collections.Counter(w for t in texts for w in regex.findall(GPT4_PATTERN, t))
    if expected:
        assert count_words(texts, GPT4_PATTERN) == expected


@pytest.mark.slow
@pytest.mark.parametrize(("chars", "vocab", "min_frequency"), [(12_000, 450, 2), (6_000, 400, 1)])
def test_merges_equal_naive_reference(shakespeare_text, wikitext_valid, chars, vocab, min_frequency):
    text = shakespeare_text[:chars] + wikitext_valid.read_text(encoding="utf-8")[:chars]
    words = count_words([text], GPT4_PATTERN)
    num_merges = vocab - 257
    assert learn_merges(words, num_merges, min_frequency) == naive_merges(words, num_merges, min_frequency)


def test_repeated_runs_and_reused_tokens_match_reference():
    words = collections.Counter({"aaaa": 5, "aaa": 3, "abab": 4, "xabc": 6, "abcy": 6, "bcab": 2, "a": 9})
    assert learn_merges(words, 40, 1) == naive_merges(words, 40, 1)


def test_training_is_deterministic_and_tie_break_is_by_bytes():
    tok = BPETokenizer.train("ab ab ba ba", vocab_size=256 + 1 + 1, min_frequency=1)
    # "ab", " b" and "ba" all occur twice: the smallest (left bytes, right bytes) wins
    assert tok.token_bytes[256:] == [b" b"]
    assert BPETokenizer.train("ab ab ba ba", 258, min_frequency=1).merges == tok.merges


@pytest.mark.slow
def test_parity_with_tiktoken_on_all_shared_data(shared_data, tok):
    enc = tiktoken_of(tok)
    for path in sorted(shared_data.rglob("*.txt")):
        text = path.read_text(encoding="utf-8")
        fresh = load_tokenizer_roundtrip(tok)
        ids = fresh.encode(text)
        assert ids == enc.encode_ordinary(text), path
        assert fresh.encode(text) == ids  # warm cache gives the same ids
        assert fresh.decode(ids) == text


def load_tokenizer_roundtrip(tok: BPETokenizer) -> BPETokenizer:
    return BPETokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(tricky_text, any_text))
def test_parity_and_roundtrip_on_generated_text(tok, text):
    assert tok.encode(text) == tiktoken_of_cached(tok).encode_ordinary(text)
    assert tok.decode(tok.encode(text)) == text


_ENCODINGS: dict[int, tiktoken.Encoding] = {}


def tiktoken_of_cached(tok: BPETokenizer) -> tiktoken.Encoding:
    return _ENCODINGS.setdefault(id(tok), tiktoken_of(tok))


@settings(max_examples=100, deadline=None)
@given(text=st.one_of(tricky_text, any_text))
def test_gpt2_pattern_roundtrip_and_parity(text):
    tok = gpt2_tok()
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text) == tiktoken_of_cached(tok).encode_ordinary(text)


_GPT2: list[BPETokenizer] = []


def gpt2_tok() -> BPETokenizer:
    if not _GPT2:
        sample = "The quick brown fox's 123 jumps\r\n  over\tthe lazy dog!! 中文 😀 " * 20
        _GPT2.append(BPETokenizer.train(sample, 256 + 40 + 1, pattern="gpt2", min_frequency=1))
    return _GPT2[0]


def test_long_words_merge_like_short_ones(tok):
    text = "a" * 3000 + " " + "ab" * 700 + " " + " " * 2000 + "x" + "😀" * 300
    assert tok.encode(text) == tiktoken_of_cached(tok).encode_ordinary(text)
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_plain_by_default_and_special_when_allowed(tok):
    text = "hello<|endoftext|>world"
    plain = tok.encode(text)
    assert tok.eot_id not in plain and tok.decode(plain) == text
    assert plain == tiktoken_of_cached(tok).encode_ordinary(text)
    special = tok.encode(text, allowed_special={"<|endoftext|>"})
    assert special == tok.encode("hello") + [tok.eot_id] + tok.encode("world")
    assert tok.encode(text, allowed_special="all") == special
    assert special == tiktoken_of_cached(tok).encode(text, allowed_special="all")
    assert tok.decode(special) == text
    assert tok.eot_id == tok.vocab_size - 1 and tok.special_tokens == {"<|endoftext|>": 1023}
    with pytest.raises(TokenizerError, match="not special tokens"):
        tok.encode(text, allowed_special={"<pad>"})


def test_merges_never_make_special_tokens():
    text = "<|endoftext|> " * 200
    with pytest.warns(UserWarning, match="stopped"):
        tok = BPETokenizer.train(text, vocab_size=300, min_frequency=1)
    assert "<|endoftext|>" in tok.special_tokens
    assert tok.eot_id not in tok.encode(text)
    assert all(rank < tok.eot_id for rank in tok.mergeable_ranks().values())


def test_encode_batch_matches_encode(tok):
    texts = ["First Citizen:\nBefore we proceed", "", "  spaced   out  ", "x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(TokenizerError, match="surrogate"):
        tok.encode("abc \ud800 def ghi jkl")
    with pytest.raises(TokenizerError, match="surrogate"):
        tok.encode("\udfff")


def test_save_load_roundtrip(tmp_path, tok, shakespeare_text):
    path = tmp_path / "tok.json"
    tok.save(path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["type"] == "bpe" and doc["version"] == 1 and doc["vocab_size"] == 1024
    back = load_tokenizer(path)
    assert isinstance(back, BPETokenizer) and back.to_dict() == tok.to_dict()
    assert back.encode(shakespeare_text[:5000]) == tok.encode(shakespeare_text[:5000])
    assert BPETokenizer.load(path).mergeable_ranks() == tok.mergeable_ranks()


def test_custom_pattern(tmp_path):
    tok = BPETokenizer.train("abc def abc def", 260, pattern=r"\w+|\s+|.", min_frequency=1)
    assert tok.pattern == r"\w+|\s+|." and tok.pattern_name is None
    assert tok.decode(tok.encode("abc, def")) == "abc, def"
    tok.save(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").encode("abc def") == tok.encode("abc def")


def test_bad_arguments_raise_tokenizer_errors():
    with pytest.raises(TokenizerError, match="vocab_size = 256: must be an integer >= 257"):
        BPETokenizer.train("hello", 256)
    with pytest.raises(TokenizerError, match="empty"):
        BPETokenizer.train("", 300)
    with pytest.raises(TokenizerError, match="empty"):
        BPETokenizer.train([], 300)
    with pytest.raises(TokenizerError, match="unknown pattern name"):
        BPETokenizer.train("hello", 300, pattern="gpt5")
    with pytest.raises(TokenizerError, match="not a valid regex"):
        BPETokenizer.train("hello", 300, pattern="(unclosed")
    with pytest.raises(TokenizerError, match=r"skips '½' \(U\+00BD, No\), so the BPE would silently drop"):
        BPETokenizer.train("hello world", 300, pattern=r"\w+")
    with pytest.raises(TokenizerError, match="distinct"):
        BPETokenizer.train("hello", 300, special_tokens=["<a>", "<a>"])
    with pytest.raises(TokenizerError, match="min_frequency"):
        BPETokenizer.train("hello", 300, min_frequency=0)


def test_small_text_stops_early_with_a_warning():
    with pytest.warns(UserWarning, match="stopped at vocab_size"):
        tok = BPETokenizer.train("hello hello", vocab_size=1000)
    assert tok.vocab_size == 256 + len(tok.merges) + 1 < 1000
    assert tok.to_dict()["vocab_size"] == tok.vocab_size


def test_min_frequency_is_honoured(shakespeare_text):
    text = shakespeare_text[:20_000]
    words = count_words([text], GPT4_PATTERN)
    with pytest.warns(UserWarning):
        tok = BPETokenizer.train(text, 5000, min_frequency=50)
    assert 0 < len(tok.merges) < 5000 - 257
    assert tok.merges == naive_merges(words, 5000, 50)


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([1, 5000])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([-1])
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # a cut multi-byte character is replaced, not an error


def test_parallel_word_counting_equals_serial(monkeypatch, shakespeare_text, wikitext_valid):
    import llm.tokenizers._bpe_train as train_module

    texts = [shakespeare_text[:150_000], wikitext_valid.read_text(encoding="utf-8")[:150_000], "tail \n "]
    serial = count_words(texts, GPT4_PATTERN, num_workers=1)
    monkeypatch.setattr(train_module, "PARALLEL_MIN_CHARS", 20_000)
    assert count_words(texts, GPT4_PATTERN, num_workers=2) == serial
    custom = r"\w+|\s+|[^\w\s]+"
    assert count_words(texts, custom, num_workers=2) == collections.Counter(
        w for t in texts for w in regex.findall(custom, t))


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(max_codepoint=127), max_size=80))
def test_ascii_fast_regex_matches_the_unicode_pattern(text):
    from llm.tokenizers.patterns import make_splitter

    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        assert make_splitter(pattern)(text) == regex.findall(pattern, text)


def test_tiny_caches_and_batched_merges_keep_parity(monkeypatch, wikitext_valid, tok):
    """Cache evictions between and within texts, and the numpy batch merge forced for every word,
    change no id."""
    text = wikitext_valid.read_text(encoding="utf-8")[:100_000]
    enc = tiktoken_of(tok)
    monkeypatch.setattr(fast, "CACHE_LIMIT", 50)
    monkeypatch.setattr(fast, "BATCH_MIN", 0)
    fresh = load_tokenizer_roundtrip(tok)
    assert fresh.encode(text) == enc.encode_ordinary(text)
    for line in text.splitlines()[:300]:  # each line partly cached, partly new: evicts mid-encode
        assert fresh.encode(line) == enc.encode_ordinary(line)


def plain_encode(tok: BPETokenizer, text: str) -> list[int]:
    """The reference: the pattern's words, each merged by the plain loop of bpe.py."""
    ranks = tok.mergeable_ranks()
    return [i for word in make_splitter(tok.pattern)(text) for i in merge(word.encode("utf-8"), ranks)]


# Runs of one letter make ties (the same pair twice in a word), which go to the leftmost pair.
AB_TOK = BPETokenizer.train("aaab aab abab baaa bbba aaaa " * 3, 256 + 9, min_frequency=1, special_tokens=())
ab_text = st.text(alphabet="ab ", max_size=600)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.one_of(tricky_text, any_text, ab_text), max_size=8))
def test_fast_engines_agree_with_the_plain_merge_loop(tok, words):
    for tokenizer in (tok, AB_TOK):
        ranks = tokenizer.mergeable_ranks()
        data = [word.encode("utf-8") for word in words if word]
        expected = [merge(word, ranks) for word in data]
        assert [fast.merge_long(word, ranks) for word in data] == expected
        assert fast.merge_batch(data, fast.PairRanks(tokenizer.token_bytes, ranks)) == expected
        text = "".join(words)
        cold = load_tokenizer_roundtrip(tokenizer)  # empty caches: many new words, merged in a batch
        assert cold.encode(text) == plain_encode(tokenizer, text)
        assert cold.encode(text + " abba") == plain_encode(tokenizer, text + " abba")  # a few, one by one
        assert cold.encode(text) == tiktoken_of_cached(tokenizer).encode_ordinary(text)


def test_plain_merge_loop_on_real_text_with_every_engine(monkeypatch, shakespeare_text, tok):
    text = shakespeare_text[:30_000]
    assert load_tokenizer_roundtrip(tok).encode(text) == plain_encode(tok, text)
    monkeypatch.setattr(fast, "LONG_WORD", 2)  # the heap merges every word of 3+ bytes
    assert load_tokenizer_roundtrip(tok).encode(text) == plain_encode(tok, text)


def test_docstring_examples_hold():
    assert doctest.testmod(llm.tokenizers.bpe).failed == 0


def test_encoding_never_scans_the_whole_word_cache(monkeypatch, tok):
    """Each call looks up its own words: a scan of the cache (once done per call by a set difference)
    made encoding line by line 25x slower."""
    def scanned(self):
        raise AssertionError("the word cache was iterated")

    fresh = load_tokenizer_roundtrip(tok)
    monkeypatch.setattr(fast._Memo, "__iter__", scanned)
    for line in ["First Citizen:\n", "Before we proceed any further, hear me speak.\n", "Speak, speak.\n"]:
        assert fresh.encode(line) == tiktoken_of_cached(tok).encode_ordinary(line)


LOSSY_PATTERNS = [
    (r"[ -~\n]+", "skips 'ǅ' (U+01C5, Lt)"),  # matches all of an ASCII training text, drops the rest
    (r"\w+|\s+", "skips '½' (U+00BD, No)"),
    (r"\S+|[ \t]+", "skips '\\xa0' (U+00A0, Zs)"),
    (r"[\s\S]|x*", "its alternative 'x*' can match the empty string"),
    (r"\b|[\s\S]", "its alternative '\\\\b' can match the empty string"),
    (r"(\w+)|[\s\S]", "has capturing groups"),
]


@pytest.mark.parametrize(("pattern", "message"), LOSSY_PATTERNS)
def test_patterns_that_would_lose_text_are_refused_when_fitting(pattern: str, message: str) -> None:
    """`[ -~\\n]+` fitted on ASCII text turned "héllo wörld 日本 🎉" into 'hllo wrld  ' when encoding;
    `[\\s\\S]|x*` passed fitting and crashed encode. Both are refused before any work now."""
    config = TokenizerConfig(vocab_size=300, pattern=pattern)
    with pytest.raises(TokenizerError) as info:
        BPETokenizer.fit("plain ascii text, nothing else\n" * 20, config)
    assert str(info.value).startswith(f"params.yaml: tokenizer.pattern = {pattern!r}: ")
    assert message in str(info.value)


@pytest.mark.parametrize("pattern", [r"\w+|\s+|.", r"(?s).", r"\S+|\s+", r"\p{L}+|\p{N}+|[^\p{L}\p{N}]"])
def test_patterns_that_cover_every_character_are_accepted(pattern: str) -> None:
    text = "héllo wörld 日本 🎉\n\tx\r\n"
    tok = BPETokenizer.train(text * 5, 260, pattern=pattern, min_frequency=1)
    assert tok.decode(tok.encode(text)) == text


def test_encoding_checks_that_the_pieces_cover_the_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tokenizer whose pattern slipped past the fit-time probe still never drops text silently."""
    monkeypatch.setattr("llm.tokenizers.patterns.check_lossless", lambda pattern: None)
    tok = BPETokenizer([], pattern=r"[ -~\n]+", special_tokens=())
    assert tok.decode(tok.encode("hello world")) == "hello world"
    with pytest.raises(TokenizerError, match="does not cut 'h\u00e9llo'... into pieces that cover it"):
        tok.encode("h\u00e9llo")

"""Evaluation: metric arithmetic, exact-once scoring of sliding windows, and the evaluate stage end to end."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_project import outputs, run_stage_in_process, write_params, write_shards

from llm.checkpoint import load_model_file
from llm.config import GenerateConfig, ModelConfig
from llm.encode import encode_corpus
from llm.errors import DataError
from llm.evaluate import evaluate_split, evaluate_splits, unk_notes, window_plan
from llm.generate import samples_report
from llm.model import GPT
from llm.plots import plot_loss
from llm.shards import TokenShards
from llm.tokenizers import SimpleTokenizer, load_tokenizer
from llm.train import train

ROOT = Path(__file__).resolve().parents[1]


class UniformModel(torch.nn.Module):
    """Zero logits: every token has probability 1/V, so the loss is exactly ln V per token."""

    def __init__(self, vocab_size: int, context: int):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, max_seq_length=context)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.config.vocab_size) + self.anchor


@pytest.fixture(scope="module")
def byte_shards(tmp_path_factory: pytest.TempPathFactory, wikitext_valid: Path) -> Path:
    """Byte-token shards of WikiText: 3,000-byte valid and test splits."""
    text = wikitext_valid.read_text(encoding="utf-8")
    return write_shards(tmp_path_factory.mktemp("project"), text, train_bytes=1000, valid_bytes=3000)


def test_uniform_model_metrics_match_hand_computation(byte_shards: Path) -> None:
    vocab = 256
    metrics = evaluate_splits(UniformModel(vocab, 64), byte_shards, ["valid", "test"], batch_size=3)
    for split in ("valid", "test"):
        info = json.loads((byte_shards / "meta.json").read_text())["splits"][split]
        scored = info["num_tokens"] - 1
        assert metrics[f"{split}_tokens"] == scored
        assert metrics[f"{split}_loss"] == pytest.approx(math.log(vocab), rel=1e-6)
        assert metrics[f"{split}_ppl"] == pytest.approx(vocab, rel=1e-5)
        # ln(256) nats a token is 8 bits a byte (one token per byte), spread over the split's words
        assert metrics[f"{split}_bpb"] == pytest.approx(8.0, rel=1e-6)
        word_ppl = math.exp(math.log(vocab) * info["num_tokens"] / info["num_words"])
        assert metrics[f"{split}_word_ppl"] == pytest.approx(word_ppl, rel=1e-5)
        assert metrics[f"{split}_unk_rate"] == 0  # a byte-level BPE represents every text
    assert unk_notes(metrics) == []


def test_unk_rate_is_the_share_of_words_outside_the_vocabulary(tmp_path: Path) -> None:
    """valid: 8 words on 2 lines, 2 of them unknown (dog, log): 2 <unk> in 10 tokens."""
    texts = {"train": "the cat sat on the mat\n", "valid": "the dog sat on the log\nthe cat\n",
             "test": "the cat sat on the mat\n"}
    (tmp_path / "raw").mkdir()
    for split, text in texts.items():
        (tmp_path / "raw" / f"{split}.txt").write_text(text, encoding="utf-8")
    tokenizer = SimpleTokenizer.train(texts["train"], vocab_size=9)
    tokenizer.save(tmp_path / "tokenizer.json")
    encode_corpus(tmp_path / "raw", tmp_path / "tokenizer.json", tmp_path / "shards", shard_tokens=64,
                  num_workers=1)
    metrics = evaluate_splits(UniformModel(tokenizer.vocab_size, 4), tmp_path / "shards", ["valid", "test"])
    assert metrics["valid_unk_rate"] == pytest.approx(2 / 10) and metrics["test_unk_rate"] == 0
    [note] = unk_notes(metrics)
    assert note.startswith("note: 20.0% of the valid tokens are <unk>: valid_bpb and valid_word_ppl")
    assert "not comparable" in note


@pytest.mark.parametrize(("num_tokens", "window", "stride"),
                         [(2, 4, 0), (9, 4, 0), (10, 4, 4), (50, 8, 3), (50, 8, 1), (51, 8, 7), (7, 16, 5)])
def test_window_plan_scores_every_target_once_with_enough_context(num_tokens: int, window: int,
                                                                   stride: int) -> None:
    counts = np.zeros(num_tokens, dtype=int)
    for index, (begin, length, skip) in enumerate(window_plan(num_tokens, window, stride)):
        assert 1 <= length <= window and 0 <= skip < length
        targets = np.arange(begin + 1, begin + length + 1)[skip:]
        counts[targets] += 1
        if index > 0:  # later windows give every scored token at least window - stride tokens of context
            assert targets[0] - begin >= window - (stride or window)
    assert counts[0] == 0 and (counts[1:] == 1).all()


def test_window_plan_rejects_a_stride_beyond_the_window() -> None:
    with pytest.raises(DataError, match="eval.stride"):
        window_plan(100, 8, 9)


def tiny_gpt(vocab_size: int = 256, context: int = 8) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=vocab_size, d_model=32, num_heads=2, num_layers=2, d_ff=64,
                           max_seq_length=context, dropout=0.0)).eval()


def test_stride_equal_to_window_is_non_overlapping_and_batching_does_not_matter(byte_shards: Path) -> None:
    model, shards = tiny_gpt(), TokenShards(byte_shards, "test")
    plain = evaluate_split(model, shards, window=8, batch_size=4)
    assert evaluate_split(model, shards, window=8, stride=8, batch_size=4) == plain
    assert evaluate_split(model, shards, window=8, batch_size=4) == plain  # deterministic
    one_by_one = evaluate_split(model, shards, window=8, batch_size=1)
    assert one_by_one[1] == plain[1] == len(shards) - 1
    assert one_by_one[0] == pytest.approx(plain[0], rel=1e-5)


def test_stride_one_scores_each_token_with_its_full_context(tmp_path: Path, wikitext_valid: Path) -> None:
    model = tiny_gpt()
    text = wikitext_valid.read_text(encoding="utf-8")[:130]
    shards = TokenShards(write_shards(tmp_path, text, train_bytes=10, valid_bytes=60), "test")
    tokens = torch.from_numpy(shards.read(0, len(shards)))
    expected = 0.0
    with torch.no_grad():
        for target in range(1, len(tokens)):
            logits = model(tokens[max(0, target - 8):target][None])
            expected -= torch.log_softmax(logits[0, -1], dim=-1)[tokens[target]].item()
    nats, scored = evaluate_split(model, shards, window=8, stride=1, batch_size=5)
    assert scored == len(tokens) - 1
    assert nats == pytest.approx(expected, rel=1e-5)
    non_overlapping, _ = evaluate_split(model, shards, window=8)
    assert nats != pytest.approx(non_overlapping, rel=1e-4)  # the context really differs


def test_missing_split_is_a_clear_error(byte_shards: Path) -> None:
    with pytest.raises(DataError, match="no split 'dev'"):
        evaluate_splits(UniformModel(256, 8), byte_shards, ["dev"])


# --- the evaluate and samples stages, end to end, on a tiny trained model ------------------------------

def run_stage_script(project: Path, stage: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=project,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_evaluate_stage_writes_metrics_and_plot(eval_project: Path) -> None:
    done = run_stage_script(eval_project, "evaluate")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((eval_project / "metrics" / "eval.json").read_text())
    for split in ("valid", "test"):
        assert set(metrics) >= {f"{split}_{key}"
                                for key in ("loss", "ppl", "bpb", "word_ppl", "tokens", "unk_rate")}
        assert 0 < metrics[f"{split}_loss"] < math.log(300)  # trained: better than uniform
        assert metrics[f"{split}_ppl"] == pytest.approx(math.exp(metrics[f"{split}_loss"]))
    assert (eval_project / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (eval_project / "reports").exists()  # samples are the samples stage's


@pytest.mark.slow
def test_samples_stage_writes_seeded_samples_headed_by_their_settings(eval_project: Path) -> None:
    done = run_stage_script(eval_project, "samples")
    assert done.returncode == 0, done.stderr
    samples = (eval_project / "reports" / "samples.txt").read_text(encoding="utf-8")
    for setting in ("prompt: 'ROMEO:'", "max_length: 20", "temperature: 0.8", "top_k: 0", "top_p: 1.0",
                    "seed: 1337", "checkpoint step: 30"):
        assert setting in samples
    assert samples.count("=== sample") == 2 and samples.count("\nROMEO:") == 2
    # Deterministic: the same model and settings give the same samples.
    model, payload = load_model_file(eval_project / "models" / "model.pt")
    tokenizer = load_tokenizer(eval_project / "data" / "tokenizer.json")
    settings = GenerateConfig(prompt="ROMEO:", max_length=20, num_samples=2, temperature=0.8)
    assert samples_report(model, tokenizer, settings, 30) == samples
    assert samples_report(model, tokenizer, settings, 30) == samples


def test_samples_stage_refuses_a_tokenizer_that_does_not_match(tmp_path: Path, eval_project: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    project = tmp_path / "project"
    shutil.copytree(eval_project, project)
    shutil.rmtree(project / "reports", ignore_errors=True)  # the other test may have written it
    tokenizer = project / "data" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    assert run_stage_in_process(project, "samples", monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.json" in err and "does not match" in err
    assert not (project / "reports").exists()


def test_evaluate_stage_refuses_shards_of_another_tokenizer(tmp_path: Path, eval_project: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    project = tmp_path / "project"
    shutil.copytree(eval_project, project)
    (project / "metrics" / "eval.json").unlink(missing_ok=True)  # the other test may have written one
    meta_path = project / "data" / "shards" / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["tokenizer_sha256"] = "f" * 64
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    assert run_stage_in_process(project, "evaluate", monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "models/model.pt: trained with tokenizer" in err
    assert "meta.json was encoded with ffffffffffff" in err
    assert not (project / "metrics" / "eval.json").exists()


@pytest.mark.parametrize(("content", "message"), [
    (None, "training log not found"),
    ("step\tval_loss\n1\t2.0\n", "no column train_loss, lr"),
    ("step\ttrain_loss\tlr\n1\tnan?\t0.1\n", "not a numeric log"),
    ("step\ttrain_loss\tlr\n1\t2.0\n", "not a numeric log"),  # a row cut short
])
def test_plot_of_a_missing_or_broken_log_is_a_data_error(tmp_path: Path, content: str | None,
                                                         message: str) -> None:
    log = tmp_path / "train_log.tsv"
    if content is not None:
        log.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        plot_loss(log, log, tmp_path / "loss.png", "title")
    assert not (tmp_path / "loss.png").exists()


def test_training_val_bpb_and_evaluate_valid_bpb_are_one_definition(tmp_path: Path, shakespeare_text: str
                                                                     ) -> None:
    """Scoring the same tokens (every validation window, a split that full windows cover exactly), the
    trainer's last val_bpb and the evaluate stage's valid_bpb of the final model are the same number."""
    write_shards(tmp_path, shakespeare_text, valid_bytes=16 * 128 + 1)  # 128 windows of 16 (+1 target)
    params = write_params(tmp_path, train={"eval_batches": 0})
    metrics = train(params, **outputs(tmp_path))
    model, _ = load_model_file(tmp_path / "models" / "model.pt")
    evaluated = evaluate_splits(model, tmp_path / "data" / "shards", ["valid"])
    assert evaluated["valid_tokens"] == 16 * 128
    assert evaluated["valid_loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)
    assert evaluated["valid_bpb"] == pytest.approx(metrics["val_bpb"], rel=1e-5)

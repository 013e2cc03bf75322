"""The `llm` command line: streaming generate, info, params.yaml defaults and one-line errors (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pytest import CaptureFixture, MonkeyPatch

from llm.checkpoint import load_model_file, save_model_file
from llm.cli import _Streamer, build_parser, main
from llm.config import GenerateConfig, ModelConfig
from llm.generate import decode_continuation, generate, samples_report
from llm.io import sha256_file
from llm.model import GPT
from llm.tokenizers import BPETokenizer, SimpleTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig(vocab_size=300, d_model=32, num_heads=2, num_layers=2, d_ff=64, max_seq_length=32,
                     dropout=0.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, shakespeare: Path) -> dict[str, Path]:
    """A byte-level BPE tokenizer and a random tiny GPT saved as a model file that names it."""
    folder = tmp_path_factory.mktemp("cli")
    tokenizer = folder / "tokenizer.json"
    BPETokenizer.train(shakespeare.read_text(encoding="utf-8")[:20000], vocab_size=300,
                       num_workers=1).save(tokenizer)
    torch.manual_seed(0)
    checkpoint = folder / "model.pt"
    save_model_file(checkpoint, GPT(CONFIG), CONFIG, sha256_file(tokenizer),
                    {"step": 7, "metrics": {"val_loss": 5.25}})
    return {"tokenizer": tokenizer, "checkpoint": checkpoint}


class Recorder:
    """A stdout that keeps every write separately, to see that text arrives piece by piece."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def generate_args(files: dict[str, Path], *extra: str) -> list[str]:
    return ["generate", "--checkpoint", str(files["checkpoint"]), "--tokenizer", str(files["tokenizer"]),
            "--device", "cpu", "--seed", "5", *extra]


def test_generate_streams_the_seeded_continuation(files: dict[str, Path], monkeypatch: MonkeyPatch) -> None:
    stdout = Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    argv = generate_args(files, "--prompt", "ROMEO:", "--max-length", "12", "--temperature", "0.8",
                         "--top-k", "50", "--top-p", "0.95", "--num-samples", "1")
    assert main(argv) == 0
    tokenizer = load_tokenizer(files["tokenizer"])
    model, _ = load_model_file(files["checkpoint"])
    prompt = torch.tensor([tokenizer.encode("ROMEO:")])
    ids = generate(model, prompt, 12, temperature=0.8, top_k=50, top_p=0.95,
                   generator=torch.Generator().manual_seed(5), eot_id=tokenizer.eot_id)[0, prompt.size(1):]
    expected = decode_continuation(tokenizer, prompt[0].tolist(), ids.tolist(), tokenizer.eot_id)
    assert "".join(stdout.writes) == "ROMEO:" + expected + "\n"
    assert len(stdout.writes) > 3  # the prompt, then the continuation piece by piece


def test_streamer_never_prints_half_a_character(files: dict[str, Path], monkeypatch: MonkeyPatch) -> None:
    tokenizer = load_tokenizer(files["tokenizer"])
    text = "héllo wörld ✓ — ok"  # multi-byte characters the tokenizer splits into byte tokens
    stdout = Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    streamer = _Streamer(tokenizer, tokenizer.eot_id)
    for token in tokenizer.encode(text) + [tokenizer.eot_id, 5]:
        streamer(torch.tensor([token]))
    streamer.finish()
    assert "".join(stdout.writes) == text + "\n"
    assert not any("\ufffd" in piece for piece in stdout.writes)


def test_streamer_puts_a_space_between_the_prompt_and_a_word_level_continuation(monkeypatch: MonkeyPatch
                                                                                 ) -> None:
    tokenizer = SimpleTokenizer.train("once upon a time there was a cat", vocab_size=11)
    stdout = Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    streamer = _Streamer(tokenizer, tokenizer.eot_id, tokenizer.encode("once upon a time"))
    for token in tokenizer.encode("there was\na cat"):
        streamer(torch.tensor([token]))
    streamer.finish()
    assert stdout.writes == [" there", " was", "\n", "a", " cat", "\n"]


def test_generate_and_samples_name_prompt_words_the_model_sees_as_unknown(tmp_path: Path,
                                                                         capsys: CaptureFixture) -> None:
    tokenizer = SimpleTokenizer.train("once upon a time there was a cat", vocab_size=11)
    tokenizer.save(tmp_path / "tokenizer.json")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, num_heads=2, num_layers=1, d_ff=64,
                         max_seq_length=16)
    save_model_file(tmp_path / "model.pt", GPT(config), config, sha256_file(tmp_path / "tokenizer.json"), {})
    argv = ["generate", "--checkpoint", str(tmp_path / "model.pt"), "--tokenizer",
            str(tmp_path / "tokenizer.json"), "--device", "cpu", "--max-length", "3", "--num-samples", "1"]
    assert main([*argv, "--prompt", "once upon a time"]) == 0
    assert "note:" not in capsys.readouterr().err
    assert main([*argv, "--prompt", "once upon a dragon"]) == 0
    err = capsys.readouterr().err
    note = ("note: 1 word(s) of the prompt are not in the tokenizer's vocabulary; "
            "the model sees 'once upon a <unk>'")
    assert note in err
    model, _ = load_model_file(tmp_path / "model.pt")
    report = samples_report(model, tokenizer, GenerateConfig(prompt="once upon a dragon", max_length=3,
                                                             num_samples=1))
    assert note in report.splitlines()  # the samples stage's report says it too


def test_info_prints_config_size_step_and_metrics(files: dict[str, Path], capsys: CaptureFixture) -> None:
    assert main(["info", str(files["checkpoint"])]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {GPT(CONFIG).num_params():,}" in out
    tokenizer_hash = sha256_file(files["tokenizer"])
    for line in ("step: 7", "d_model: 32", "num_layers: 2", "val_loss: 5.25", tokenizer_hash):
        assert line in out


def assert_one_line_error(capsys: CaptureFixture, code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err


def test_missing_and_corrupt_checkpoints_exit_2_with_one_line(tmp_path: Path, files: dict[str, Path],
                                                              capsys: CaptureFixture) -> None:
    missing = tmp_path / "nope.pt"
    assert_one_line_error(capsys, main(["info", str(missing)]), "nope.pt", "not found")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(files["checkpoint"].read_bytes()[:300])
    assert_one_line_error(capsys, main(["info", str(corrupt)]), "corrupt.pt", "not a readable checkpoint")
    args = generate_args(files, "--checkpoint", str(corrupt))
    assert_one_line_error(capsys, main(args), "corrupt.pt")


def test_tokenizer_that_does_not_match_the_checkpoint_exits_2(tmp_path: Path, files: dict[str, Path],
                                                               capsys: CaptureFixture) -> None:
    other = tmp_path / "other.json"
    other.write_text(files["tokenizer"].read_text(encoding="utf-8") + " ", encoding="utf-8")
    code = main(generate_args(files, "--tokenizer", str(other)))
    assert_one_line_error(capsys, code, "other.json", "does not match")


BAD_OPTIONS = [(["--prompt", ""], "--prompt is empty"), (["--top-p", "0"], "--top-p"),
               (["--max-length", "0"], "--max-length"), (["--temperature", "-1"], "--temperature"),
               (["--seed", str(2**70)], "--seed = 1180591620717411303424: must be <= 9223372036854775807"),
               (["--max-length", "100000000000"], "--max-length = 100000000000: must be <= 1048576"),
               (["--max-length", "1e11"], "llm generate: argument --max-length: invalid int value: '1e11'; "
                                          "see `llm generate --help`"),
               (["--devise", "cpu"], "llm: unrecognized arguments: --devise cpu")]


@pytest.mark.parametrize(("flags", "needle"), BAD_OPTIONS)
def test_bad_generate_options_exit_2(files: dict[str, Path], capsys: CaptureFixture, flags: list[str],
                                     needle: str) -> None:
    assert_one_line_error(capsys, main(generate_args(files, *flags)), needle)


def test_generate_defaults_come_from_params_yaml(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert build_parser().parse_args(["generate"]).max_length == 100  # no params.yaml: dataclass defaults
    settings = {"prompt": "Hark", "max_length": 7, "temperature": 0.5, "top_k": 3, "num_samples": 2,
                "seed": 9}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"generate": settings}), encoding="utf-8")
    args = build_parser().parse_args(["generate"])
    assert (args.prompt, args.max_length, args.temperature, args.top_k, args.num_samples, args.seed) == \
        ("Hark", 7, 0.5, 3, 2, 9)
    assert (args.checkpoint, args.tokenizer) == ("models/model.pt", "data/tokenizer.json")


@pytest.mark.slow
def test_python_dash_m_runs_the_cli(files: dict[str, Path]) -> None:
    done = subprocess.run([sys.executable, "-m", "llm.cli", "info", str(files["checkpoint"])], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "step: 7" in done.stdout, done.stderr


def test_a_tiny_temperature_samples_the_most_likely_tokens(files: dict[str, Path],
                                                           capsys: CaptureFixture) -> None:
    """logits / 1e-40 overflowed to +-inf and the draw failed on NaN probabilities; now it is greedy."""
    assert main(generate_args(files, "--temperature", "1e-40", "--max-length", "30")) == 0
    tiny = capsys.readouterr().out
    assert main(generate_args(files, "--temperature", "0", "--max-length", "30")) == 0
    assert tiny == capsys.readouterr().out


def test_ctrl_c_is_one_line_and_exit_130(files: dict[str, Path], monkeypatch: MonkeyPatch,
                                         capsys: CaptureFixture) -> None:
    def pressed_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llm.generate.generate", pressed_ctrl_c)
    try:
        code = main(generate_args(files))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped llm's main as a KeyboardInterrupt traceback")
    assert code == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.slow
def test_a_reader_that_stops_early_ends_generate_quietly(files: dict[str, Path]) -> None:
    """`llm generate | head -c 20`: no BrokenPipeError traceback; the exit status of a SIGPIPE'd writer."""
    args = generate_args(files, "--max-length", "1000", "--num-samples", "3")
    process = subprocess.Popen([sys.executable, "-m", "llm.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout.read(20)  # then the reader goes away, as `head` does
    process.stdout.close()
    _, err = process.communicate(timeout=120)
    assert (process.returncode, err) == (141, b"")

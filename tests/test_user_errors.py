"""The promise of the README: a problem the user can fix prints ONE line, `error: ...`, that names the file or
key, the bad value and the fix, and exits 2; never a traceback, and before the work rather than after.

Each case breaks one thing in a copy of a tiny finished project (params, raw text, tokenizer, shards,
model and logs), then runs a stage script as `python stages/<stage>.py` runs it, or the `llm` command.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pipeline_project import STAGES, build_project, dvc, run, write_params
from train_project import TINY_MODEL, run_stage_in_process

import llm.memory
from llm.cli import main

ROOT = Path(__file__).resolve().parents[1]
DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
DECLARED = {name: stage.get("params", []) for name, stage in DVC_STAGES.items()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, eval_project: Path, shakespeare: Path) -> Path:
    """A project every stage could run in: raw text, tokenizer, shards, a trained model, logs, params."""
    project = Path(shutil.copytree(eval_project, tmp_path_factory.mktemp("finished") / "project"))
    write_params(project, model=TINY_MODEL, data={"dataset": "text_files", "text_files_dir": "corpus"},
                 encode={"shard_tokens": 1024})
    (project / "corpus").mkdir()
    (project / "corpus" / "input.txt").write_text(shakespeare.read_text(encoding="utf-8")[:30_000])
    return project


@pytest.fixture()
def project(finished: Path, tmp_path: Path) -> Path:
    """A fresh copy of the finished project, to break one thing in."""
    return Path(shutil.copytree(finished, tmp_path / "project"))


def assert_one_error_line(err: str, code: int, *needles: str) -> None:
    """Exit code 2 and exactly one line on stderr, `error: ...`, containing every needle."""
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def edit_params(project: Path, change: Callable[[dict], object]) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    change(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def set_param(section: str, key: str, value: object, **more: object) -> Callable[[Path], None]:
    return lambda project: edit_params(project, lambda params: params[section].update({key: value, **more}))


def edit_model_file(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def breaker(project: Path) -> None:
        path = project / "models" / "model.pt"
        payload = torch.load(path, weights_only=True)
        change(payload)
        torch.save(payload, path)
    return breaker


def replace_with_file(relative: str) -> Callable[[Path], None]:
    def breaker(project: Path) -> None:
        path = project / relative
        shutil.rmtree(path, ignore_errors=True)
        path.write_text("a file where a folder should be\n")
    return breaker


def replace_with_folder(relative: str) -> Callable[[Path], None]:
    def breaker(project: Path) -> None:
        path = project / relative
        path.unlink(missing_ok=True)
        path.mkdir(parents=True)
    return breaker


def out_of_range_id(project: Path) -> None:
    for split in ("train", "valid"):
        shard = project / "data" / "shards" / split / "shard_00000.npy"
        tokens = np.load(shard)
        tokens[7] = 300  # == vocab_size: one past the last id
        np.save(shard, tokens)


def widen_embedding(payload: dict) -> None:
    payload["model"]["token_embedding.weight"] = torch.zeros(300, 48)


# (id, stage, what to break, what the one line must say)
STAGE_CASES = [
    ("params.yaml not UTF-8", "encode",
     lambda p: (p / "params.yaml").write_bytes(b"encode:\n  shard_tokens: 1024  # caf\xe9\n"),
     ["params.yaml: not valid UTF-8 at byte 35 (bad byte 0xe9)"]),
    ("params.yaml a folder", "train", replace_with_folder("params.yaml"),
     ["params.yaml: cannot be read (Is a directory)"]),
    ("model.pt empty", "evaluate", lambda p: (p / "models" / "model.pt").write_bytes(b""),
     ["models/model.pt: not a readable checkpoint (EOFError)", "delete it and re-run training"]),
    ("model.pt empty", "samples", lambda p: (p / "models" / "model.pt").write_bytes(b""),
     ["models/model.pt: not a readable checkpoint (EOFError)"]),
    ("model_config a string", "evaluate", edit_model_file(lambda m: m.__setitem__("model_config", "gpt")),
     ["models/model.pt: model_config = 'gpt': must be a mapping"]),
    ("d_model a string", "samples", edit_model_file(lambda m: m["model_config"].__setitem__("d_model", "32")),
     ["models/model.pt: model_config.d_model = '32': must be an integer"]),
    ("weights of another shape", "evaluate", edit_model_file(lambda m: widen_embedding(m)),
     ["models/model.pt: its weights do not match its model config (size mismatch for "
      "token_embedding.weight: copying a param with shape torch.Size([300, 48])"]),
    ("metrics a file", "evaluate", replace_with_file("metrics"),
     ["metrics: is a file, but metrics/eval.json must be written inside it as a folder"]),
    ("plots a file", "evaluate", replace_with_file("plots"), ["plots: is a file, but plots/loss.png"]),
    ("reports a file", "samples", replace_with_file("reports"), ["reports: is a file"]),
    ("metrics a file", "train", replace_with_file("metrics"), ["metrics: is a file"]),
    ("tokenizer.json a folder", "fit_tokenizer", replace_with_folder("data/tokenizer.json"),
     ["data/tokenizer.json: is a folder, but this stage writes it as a file"]),
    ("shard id out of range", "train", out_of_range_id,
     ["train/shard_00000.npy: holds token id 300, but vocab_size is 300", "run `dvc repro encode` again"]),
    ("shard id out of range", "evaluate", out_of_range_id, ["valid/shard_00000.npy: holds token id 300"]),
    ("d_model huge", "train", set_param("model", "d_model", 10**9),
     ["params.yaml: model.d_model = 1000000000: must be <= 65536"]),
    ("num_layers huge", "train", set_param("model", "num_layers", 10**6),
     ["params.yaml: model.num_layers = 1000000: must be <= 1024"]),
    ("shard_tokens huge", "encode", set_param("encode", "shard_tokens", 10**12),
     ["params.yaml: encode.shard_tokens = 1000000000000: must be <= 1073741824"]),
    ("vocab_size huge", "fit_tokenizer", set_param("tokenizer", "vocab_size", 10**7),
     ["params.yaml: tokenizer.vocab_size = 10000000: must be <= 1048576"]),
    ("pattern that skips characters", "fit_tokenizer", set_param("tokenizer", "pattern", "[ -~\n]+"),
     ["params.yaml: tokenizer.pattern = '[ -~\\n]+': skips", "add a last alternative"]),
    ("url without a host", "download", set_param("data", "url", "http://", dataset="url"),
     ["params.yaml: data.url = 'http://': names no host"]),
    ("url with a broken IPv6 host", "download", set_param("data", "url", "http://[::1", dataset="url"),
     ["params.yaml: data.url = 'http://[::1': not a valid URL (Invalid IPv6 URL)"]),
    ("more text than max_bytes", "download", set_param("data", "max_bytes", 10_000),
     ["data.max_bytes = 10000: data.text_files_dir 'corpus' holds more text than that",
      "raise data.max_bytes"]),
]


@pytest.mark.parametrize(("stage", "breaker", "needles"), [case[1:] for case in STAGE_CASES],
                         ids=[f"{case[1]}: {case[0]}" for case in STAGE_CASES])
def test_a_broken_input_is_one_error_line_and_exit_2(project: Path, stage: str, breaker: Callable,
                                                     needles: list[str], monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    breaker(project)
    code = run_stage_in_process(project, stage, monkeypatch)
    assert_one_error_line(capsys.readouterr().err, code, *needles)


@pytest.mark.parametrize(("stage", "section"), [(stage, section) for stage, sections in DECLARED.items()
                                                for section in sections])
def test_a_missing_section_stops_the_stage_as_dvc_would(project: Path, stage: str, section: str,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    """`dvc repro` refuses to run a stage whose declared params section is missing; run by hand, the
    stage script refuses too, naming the section, instead of quietly taking the defaults."""
    assert stage in STAGES
    edit_params(project, lambda params: params.pop(section))
    code = run_stage_in_process(project, stage, monkeypatch)
    assert_one_error_line(capsys.readouterr().err, code, f"params.yaml: section {section!r} is missing")


@pytest.mark.slow
def test_dvc_and_the_stage_script_both_stop_on_a_missing_section(tmp_path: Path, shakespeare: Path) -> None:
    project = build_project(tmp_path / "project", shakespeare.parent)
    edit_params(project, lambda params: params.pop("data"))
    done = dvc(project, "repro", "--dry", "download", check=False)
    assert done.returncode != 0 and "Parameters 'data' are missing from 'params.yaml'" in done.stdout
    script = run(project, sys.executable, "stages/download.py", check=False)
    assert script.returncode == 2 and script.stdout == (
        "error: params.yaml: section 'data' is missing; this stage reads it and `dvc repro` stops without "
        "it: add `data:` (keys left out take their defaults)\n")


def test_a_model_that_cannot_fit_is_refused_before_allocating(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(llm.memory, "device_memory", lambda device: 1 << 20)  # a 1 MiB device
    before = (project / "models" / "model.pt").read_bytes()
    code = run_stage_in_process(project, "train", monkeypatch)
    assert_one_error_line(capsys.readouterr().err, code, "params.yaml: model (d_model 32, num_layers 2",
                          "needs at least", "but the cpu has 0.0 GiB", "make model.d_model")
    assert (project / "models" / "model.pt").read_bytes() == before


def test_stale_temporaries_of_killed_writes_are_swept_when_the_stage_runs(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A SIGKILL during a checkpoint or model write leaves `.tmp-<name>.XXXXXXXX` beside it (25 MB each for
    the default model); the next run of the stage removes them, and nothing else."""
    stale = [project / name for name in ("checkpoints/.tmp-last.pt.k1ll3d_x", "models/.tmp-model.pt.zz9",
                                         "checkpoints/.tmp-best_model.pt.abc", "metrics/.tmp-val_log.tsv.q")]
    kept = [project / "checkpoints" / "notes.txt", project / "models" / ".tmp-model.pt.keep.me"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    assert run_stage_in_process(project, "train", monkeypatch) == 0, capsys.readouterr().err
    assert not [path for path in stale if path.exists()]
    assert all(path.exists() for path in kept)


# ----- the `llm` command ------------------------------------------------------------------------------

def model_file_a_folder(project: Path) -> None:
    """models/model.pt replaced by a folder of that name."""
    model = project / "models" / "model.pt"
    model.unlink()
    model.mkdir()


CLI_CASES = [
    ("empty model file", lambda p: p.write_bytes(b""), "not a readable checkpoint (EOFError)"),
    ("model file a folder", model_file_a_folder, "is a folder, not a checkpoint"),
    ("model_config a string", edit_model_file(lambda m: m.__setitem__("model_config", "gpt")),
     "model_config = 'gpt': must be a mapping"),
    ("d_model a string", edit_model_file(lambda m: m["model_config"].__setitem__("d_model", "32")),
     "model_config.d_model = '32': must be an integer"),
    ("format_version a string", edit_model_file(lambda m: m.__setitem__("format_version", "2")),
     "format_version '2' is not a version number"),
    ("weights of another shape", edit_model_file(widen_embedding),
     "size mismatch for token_embedding.weight"),
    ("format 1, model_config a string",
     edit_model_file(lambda m: m.update(format_version=1, model_config="gpt")),
     "model_config = 'gpt': must be a mapping"),
    ("format 1, a QKV weight of another size",
     edit_model_file(lambda m: (m.__setitem__("format_version", 1),
                                m["model"].__setitem__("blocks.0.attn.qkv.weight", torch.zeros(5)))),
     "a format_version 1 RoPE file whose QKV weights cannot be reordered"),
]


@pytest.mark.parametrize("command", ["info", "generate"])
@pytest.mark.parametrize(("breaker", "needle"), [case[1:] for case in CLI_CASES],
                         ids=[case[0] for case in CLI_CASES])
def test_a_broken_model_file_is_one_error_line_in_the_cli(project: Path, command: str, breaker: Callable,
                                                          needle: str, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    model = project / "models" / "model.pt"
    breaker(model if breaker is CLI_CASES[0][1] else project)
    monkeypatch.chdir(project)
    code = main(["info", str(model)] if command == "info" else ["generate", "--checkpoint", str(model)])
    assert_one_error_line(capsys.readouterr().err, code, str(model), needle)

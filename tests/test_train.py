"""The trainer in-process: schedule, fingerprint, outputs, explicit resume and its failure modes."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch
from pipeline_project import write_params
from train_project import (
    assert_same_weights,
    crash_in_forward,
    fail_forward_at,
    make_project,
    model_state,
    outputs,
)

import llm.checkpoint
from llm.checkpoint import load_model_file, read_checkpoint
from llm.config import TrainConfig
from llm.errors import CheckpointError, LLMError, OutputError
from llm.fingerprint import describe_changes, make_fingerprint
from llm.resume import KEEP_NOTE
from llm.train import TIMING_METRICS, lr_at, train
from llm.train_data import total_steps
from llm.trainlog import TRAIN_COLUMNS, VAL_COLUMNS, read_tsv

pytestmark = pytest.mark.usefixtures("one_thread")
METRIC_KEYS = {"train_loss", "val_loss", "val_ppl", "val_bpb", "tokens_per_sec", "num_params",
               "train_time_s", "device", "steps", "epochs"}


def test_lr_schedule_warms_up_peaks_and_ends_at_min_lr() -> None:
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [lr_at(step, 100, cfg) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[4] == pytest.approx(5e-4)
    assert lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    midway = 10 + (100 - 1 - 10) / 2
    assert lr_at(int(midway), 100, cfg) == pytest.approx(5.5e-4, rel=0.02)
    assert lr_at(0, 5, TrainConfig(learning_rate=1e-3, min_lr=0.0, warmup_steps=0)) == pytest.approx(1e-3)


def test_total_steps_counts_epochs_capped_by_max_steps() -> None:
    assert total_steps(TrainConfig(max_epochs=3, max_steps=0), 40) == 120
    assert total_steps(TrainConfig(max_epochs=3, max_steps=50), 40) == 50
    assert total_steps(TrainConfig(max_epochs=1, max_steps=500), 40) == 40


def test_fingerprint_follows_results_not_bookkeeping() -> None:
    model, cfg = llm.config.ModelConfig(), TrainConfig()
    base = make_fingerprint(model, cfg, "shards", "tok")
    bookkeeping = dataclasses.replace(cfg, resume="checkpoints/best_model.pt", checkpoint_interval=7)
    assert make_fingerprint(model, bookkeeping, "shards", "tok").digest == base.digest
    changed = make_fingerprint(model, dataclasses.replace(cfg, learning_rate=1e-3), "shards", "tok")
    assert changed.digest != base.digest
    assert describe_changes(base, changed) == ["train.learning_rate 0.0003 -> 0.001"]
    other = make_fingerprint(dataclasses.replace(model, d_model=64), cfg, "new shards", "tok")
    assert describe_changes(base, other) == ["model.d_model 512 -> 64",
                                             "the token shards changed (data/shards/meta.json)"]


def test_train_writes_model_checkpoints_metrics_and_curves(tmp_path: Path, shakespeare_text: str) -> None:
    project = make_project(tmp_path / "p", shakespeare_text)
    params = write_params(project)
    metrics = train(params, **outputs(project))

    saved = (project / "metrics" / "train.json").read_text(encoding="utf-8")
    assert set(metrics) >= METRIC_KEYS and "mfu" not in metrics  # no known peak FLOP/s on a CPU
    assert all(f'"{key}"' in saved for key in METRIC_KEYS)
    assert metrics["steps"] == 8 and metrics["device"] == "cpu" and metrics["epochs"] == round(8 / 63, 4)
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
    # Byte tokens: one token per byte, so bits per byte is nats per token / ln 2.
    assert metrics["val_bpb"] == pytest.approx(metrics["val_loss"] / math.log(2), rel=1e-6)

    train_rows = read_tsv(project / "metrics" / "train_log.tsv")
    val_rows = read_tsv(project / "metrics" / "val_log.tsv")
    assert list(train_rows[0]) == list(TRAIN_COLUMNS) and list(val_rows[0]) == list(VAL_COLUMNS)
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert [r["step"] for r in val_rows] == [4, 8]
    assert train_rows[-1]["lr"] == pytest.approx(params.train.min_lr)
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"]
    assert metrics["val_loss"] == pytest.approx(val_rows[-1]["val_loss"], rel=1e-6)

    model, payload = load_model_file(project / "models" / "model.pt")
    assert payload["step"] == 8 and payload["metrics"]["val_loss"] == metrics["val_loss"]
    assert payload["params"]["train"]["learning_rate"] == params.train.learning_rate
    assert model.config.vocab_size == 256
    best, best_payload = load_model_file(project / "checkpoints" / "best_model.pt")
    assert best_payload["step"] == 8  # validation improved at every evaluation of this short run
    last = read_checkpoint(project / "checkpoints" / "last.pt")
    assert {"optimizer", "rng", "fingerprint", "epoch", "position", "progress", "log", "origin"} <= set(last)
    assert last["step"] == 8 and not any(k.startswith(("_orig_mod.", "module.")) for k in last["model"])
    assert_same_weights(last["model"], model.state_dict())


def test_identical_runs_write_byte_identical_model_files(tmp_path: Path, shakespeare_text: str) -> None:
    """DVC caches models/model.pt by its hash: the same params and seed must give the same bytes."""
    files = []
    for name in ("first", "second"):
        project = make_project(tmp_path / name, shakespeare_text)
        train(write_params(project), **outputs(project))
        files.append(project / "models" / "model.pt")
    assert files[0].read_bytes() == files[1].read_bytes()
    stored = load_model_file(files[0])[1]["metrics"]
    assert stored["val_loss"] > 0 and not set(TIMING_METRICS) & set(stored)  # timings live in metrics only


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_each_optimizer_trains_and_every_group_follows_the_schedule(tmp_path: Path, shakespeare_text: str,
                                                                     optimizer: str) -> None:
    project = make_project(tmp_path / "p", shakespeare_text)
    params = write_params(project, train={"optimizer": optimizer, "muon_lr": 0.03})
    train(params, **outputs(project))
    rows = read_tsv(project / "metrics" / "train_log.tsv")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    groups = read_checkpoint(project / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    muon_groups = [g for g in groups if g.get("use_muon")]
    assert bool(muon_groups) == (optimizer == "muon")
    end_scale = params.train.min_lr / params.train.learning_rate  # the last step runs at min_lr
    for group in groups:
        peak = 0.03 if group.get("use_muon") else params.train.learning_rate
        assert group["peak_lr"] == peak and group["lr"] == pytest.approx(peak * end_scale)


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path: Path, shakespeare_text: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path / "p", shakespeare_text)
    params = write_params(project, train={"checkpoint_interval": 3})
    fail_forward_at(monkeypatch, 7, lambda loss: loss * float("nan"))
    expected = r"loss became nan at step 7; lower train.learning_rate.*step 6\) is kept"
    with pytest.raises(LLMError, match=expected):
        train(params, **outputs(project))
    kept = read_checkpoint(project / "checkpoints" / "last.pt")
    assert kept["step"] == 6 and all(torch.isfinite(t).all() for t in kept["model"].values())
    assert not (project / "models" / "model.pt").exists()


def test_unwritable_checkpoint_dir_is_a_clear_error(tmp_path: Path, shakespeare_text: str) -> None:
    project = make_project(tmp_path / "p", shakespeare_text)
    params = write_params(project)
    blocker = project / "checkpoints"
    blocker.write_text("a file where the checkpoint folder should be", encoding="utf-8")
    with pytest.raises(OutputError, match=f"{blocker}: is a file, but .*last.pt must be written inside it"):
        train(params, **outputs(project))


def test_failed_checkpoint_write_names_path_and_keeps_previous(tmp_path: Path, shakespeare_text: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path / "p", shakespeare_text)
    params = write_params(project, train={"checkpoint_interval": 2, "eval_interval": 100})
    real_save, saves = torch.save, [0]

    def save_that_dies_midway(obj, file, *args, **kwargs):
        saves[0] += 1
        if saves[0] == 2:
            file.write(b"half a checkpoint")
            raise RuntimeError("disk full")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(llm.checkpoint.torch, "save", save_that_dies_midway)
    last = project / "checkpoints" / "last.pt"
    with pytest.raises(CheckpointError, match=f"{last}: could not write the checkpoint.*disk full"):
        train(params, **outputs(project))
    assert read_checkpoint(last)["step"] == 2
    assert [p.name for p in last.parent.iterdir()] == ["last.pt"]  # no temp file left behind


def test_explicit_resume_continues_exactly_and_checks_the_model(tmp_path: Path, shakespeare_text: str, capsys,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    reference = make_project(tmp_path / "reference", shakespeare_text)
    train(write_params(reference), **outputs(reference))

    interrupted = make_project(tmp_path / "interrupted", shakespeare_text)
    crash_in_forward(monkeypatch, interrupted, write_params(interrupted))
    saved = tmp_path / "saved.pt"
    shutil.move(interrupted / "checkpoints" / "last.pt", saved)
    capsys.readouterr()
    from_saved = write_params(interrupted, train={"resume": str(saved), "checkpoint_interval": 1})
    crash_in_forward(monkeypatch, interrupted, from_saved, call=3)  # crashes in step 7: last.pt at step 6
    said = capsys.readouterr().out.splitlines()
    assert said[0] == f"train.resume = {saved}: starting from it; {KEEP_NOTE}"  # the first line names it
    assert said[1] == (f"train.resume: loaded model weights, optimizer state, step 4 and RNG state from "
                       f"{saved} (same params: this continues that run exactly)")

    train(from_saved, **outputs(interrupted))  # continues its own last.pt, not `saved` again
    said = capsys.readouterr().out.splitlines()
    last = interrupted / "checkpoints" / "last.pt"
    assert said[0] == f"train.resume = {saved}: continuing {last}, the run that started from it; {KEEP_NOTE}"
    assert said[1].startswith(f"resuming from {last} at step 6/8")
    assert_same_weights(model_state(interrupted / "models" / "model.pt"),
                        model_state(reference / "models" / "model.pt"))
    val_log = Path("metrics") / "val_log.tsv"
    assert read_tsv(interrupted / val_log) == read_tsv(reference / val_log)

    fresh = make_project(tmp_path / "weights-only", shakespeare_text)
    train(write_params(fresh, train={"resume": str(reference / "models" / "model.pt"), "max_steps": 2}),
          **outputs(fresh))
    assert "loaded model weights from" in capsys.readouterr().out

    wider = write_params(fresh, model={"d_model": 64}, train={"resume": str(saved)})
    expected = r"its model differs from params.yaml \(model.d_model 32 -> 64\)"
    with pytest.raises(CheckpointError, match=expected):
        train(wider, **outputs(make_project(tmp_path / "wider", shakespeare_text)))


def test_explicit_resume_across_optimizers_keeps_the_weights_only(tmp_path: Path, shakespeare_text: str,
                                                                  capsys) -> None:
    adamw_run = make_project(tmp_path / "adamw", shakespeare_text)
    train(write_params(adamw_run, train={"optimizer": "adamw"}), **outputs(adamw_run))
    saved = adamw_run / "checkpoints" / "last.pt"
    muon_run = make_project(tmp_path / "muon", shakespeare_text)
    capsys.readouterr()
    params = write_params(muon_run, train={"optimizer": "muon", "resume": str(saved), "max_steps": 2})
    metrics = train(params, **outputs(muon_run))
    said = capsys.readouterr().out
    assert (f"train.resume: loaded model weights from {saved}; its optimizer state is adamw's and "
            "train.optimizer is muon, so the optimizer starts fresh at step 0") in said
    assert metrics["steps"] == 2


def test_explicit_resume_from_a_format_1_rope_checkpoint_reorders_its_weights(tmp_path: Path,
                                                                             shakespeare_text: str,
                                                                             capsys) -> None:
    """A RoPE last.pt written before format 2 starts a run with its weights (QKV rows reordered to the
    adjacent-pair layout) and a fresh optimizer, and the run says why."""
    first = make_project(tmp_path / "first", shakespeare_text)
    train(write_params(first, model={"position": "rope"}), **outputs(first))
    payload = torch.load(first / "checkpoints" / "last.pt", weights_only=True)
    current = {name: tensor.clone() for name, tensor in payload["model"].items()}
    heads, head_size = payload["model_config"]["num_heads"], 32 // payload["model_config"]["num_heads"]
    assert payload["model_config"]["d_model"] == 32
    back = torch.arange(head_size).view(2, -1).t().flatten().argsort()  # format 2 row -> format 1 row
    for name in [name for name in payload["model"] if name.endswith("attn.qkv.weight")]:
        rows = payload["model"][name].unflatten(0, (3, heads, head_size)).clone()
        rows[:2] = rows[:2, :, back]
        payload["model"][name] = rows.flatten(0, 2)
    payload["format_version"] = 1
    old = tmp_path / "format1.pt"
    torch.save(payload, old)
    upgraded = read_checkpoint(old)
    assert upgraded["optimizer"] is None and upgraded["format_version"] == 2
    assert_same_weights(upgraded["model"], current)

    second = make_project(tmp_path / "second", shakespeare_text)
    capsys.readouterr()
    params = write_params(second, model={"position": "rope"}, train={"resume": str(old), "max_steps": 2})
    metrics = train(params, **outputs(second))
    assert (f"train.resume: loaded model weights from {old} (it holds no optimizer state this code can "
            "use: a model file, or a RoPE checkpoint of format_version 1); starting at step 0"
            ) in capsys.readouterr().out
    assert metrics["steps"] == 2

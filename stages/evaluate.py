"""evaluate stage: held-out metrics (metrics/eval.json) and the loss plot (plots/loss.png)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.stage import dependencies_or_exit, run_stage

with dependencies_or_exit():
    from llm.checkpoint import load_model_file
    from llm.config import load_params
    from llm.evaluate import check_same_tokenizer, evaluate_splits, unk_notes
    from llm.hardware import autocast, resolve_device, resolve_precision, set_threads
    from llm.io import check_outputs, write_json_atomic
    from llm.plots import plot_loss, run_title
    from llm.shards import read_meta

MODEL, SHARDS = Path("models/model.pt"), Path("data/shards")
TRAIN_LOG, VAL_LOG = Path("metrics/train_log.tsv"), Path("metrics/val_log.tsv")
EVAL_JSON, LOSS_PLOT = Path("metrics/eval.json"), Path("plots/loss.png")


def main() -> None:
    params = load_params(sections=("eval",))
    check_outputs(EVAL_JSON, LOSS_PLOT)
    device = resolve_device(params.runtime.device)
    model, payload = load_model_file(MODEL, device)
    precision = resolve_precision(params.runtime.precision, device, model.config.d_model)
    set_threads(params.runtime.threads, model, device,
                rows=params.eval.batch_size * model.config.max_seq_length)
    shards_meta = read_meta(SHARDS)
    check_same_tokenizer(payload, MODEL, shards_meta, SHARDS)
    with autocast(precision, device):
        metrics = evaluate_splits(model, SHARDS, params.eval.splits, stride=params.eval.stride,
                                  batch_size=params.eval.batch_size, progress=params.runtime.progress)
    write_json_atomic(EVAL_JSON, metrics)
    title = run_title(payload, shards_meta.get("tokenizer_type", "?"))
    plot_loss(TRAIN_LOG, VAL_LOG, LOSS_PLOT, title)
    print(", ".join(f"{key} {value:.4g}" for key, value in metrics.items()))
    for note in unk_notes(metrics):
        print(note)


if __name__ == "__main__":
    run_stage(main)

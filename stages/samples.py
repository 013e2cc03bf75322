"""samples stage: continuations of generate.prompt by models/model.pt, written to reports/samples.txt."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.stage import dependencies_or_exit, run_stage

with dependencies_or_exit():
    from llm.checkpoint import load_model_file
    from llm.config import load_params
    from llm.generate import check_tokenizer_matches, samples_report
    from llm.hardware import autocast, resolve_device, resolve_precision, set_threads
    from llm.io import check_outputs, write_text_atomic
    from llm.tokenizers import load_tokenizer

MODEL, TOKENIZER, SAMPLES = Path("models/model.pt"), Path("data/tokenizer.json"), Path("reports/samples.txt")


def main() -> None:
    """Sample with the generate params (seeded) and write the report."""
    params = load_params(sections=("generate",))
    check_outputs(SAMPLES)
    device = resolve_device(params.runtime.device)
    precision = resolve_precision(params.runtime.precision, device)
    model, payload = load_model_file(MODEL, device)
    set_threads(params.runtime.threads, model, device, rows=1)  # one sample, one token at a time
    check_tokenizer_matches(TOKENIZER, payload, MODEL)
    tokenizer = load_tokenizer(TOKENIZER)
    with autocast(precision, device):
        report = samples_report(model, tokenizer, params.generate, payload.get("step"))
    write_text_atomic(SAMPLES, report)
    print(f"samples: {params.generate.num_samples} continuations of {params.generate.prompt!r} -> {SAMPLES}")


if __name__ == "__main__":
    run_stage(main)

"""fit_tokenizer stage: learn the tokenizer on data/raw/train.txt and write data/tokenizer.json."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.stage import dependencies_or_exit, run_stage

with dependencies_or_exit():
    from llm.config import load_params
    from llm.io import check_outputs
    from llm.tokenizers.fit import fit_tokenizer, read_training_text

TRAIN_TEXT = Path("data/raw/train.txt")
OUT = Path("data/tokenizer.json")


def main() -> None:
    """Fit, save atomically, and report the size reached and the time taken."""
    params = load_params(sections=("tokenizer",))
    check_outputs(OUT)
    config = params.tokenizer
    text = read_training_text(TRAIN_TEXT)
    start = time.perf_counter()
    tokenizer = fit_tokenizer(text, config, progress=params.runtime.progress,
                              num_workers=params.runtime.num_workers)
    tokenizer.save(OUT)
    print(f"fit_tokenizer: {config.tokenizer_type} vocab_size {tokenizer.vocab_size} "
          f"(asked {config.vocab_size}) in {time.perf_counter() - start:.2f}s -> {OUT}")


if __name__ == "__main__":
    run_stage(main)

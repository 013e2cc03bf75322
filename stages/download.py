"""Download stage: write the corpus that params.yaml `data` names to data/raw/{train,valid,test}.txt."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.stage import dependencies_or_exit, run_stage

with dependencies_or_exit():
    from llm.config import load_params
    from llm.data import prepare_raw
    from llm.io import check_outputs

RAW = Path("data/raw")


def main() -> None:
    """Write data/raw and print one summary line per split."""
    params = load_params(sections=("data",))
    check_outputs(folders=(RAW,))
    stats = prepare_raw(params.data, RAW, progress=params.runtime.progress)
    for split, split_stats in stats.items():
        print(split_stats.summary(split))


if __name__ == "__main__":
    run_stage(main)

"""Train stage: token shards -> models/model.pt, metrics/train.json and the training curves.

Continues checkpoints/last.pt when it is an unfinished run of the same params, inputs and code
(llm/resume.py); Ctrl-C or SIGTERM stops after the current step with last.pt written. With
runtime.nproc_per_node > 1 it re-runs itself under torchrun (one process per GPU).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.stage import dependencies_or_exit, run_stage

with dependencies_or_exit():
    from llm.config import load_params
    from llm.launch import relaunch_under_torchrun


def main() -> None:
    """Train with params.yaml, in this process or under torchrun."""
    params = load_params(sections=("model", "train"))
    exit_code = relaunch_under_torchrun(params.runtime.nproc_per_node, str(Path(__file__).resolve()))
    if exit_code is not None:
        sys.exit(exit_code)
    with dependencies_or_exit():
        from llm.train import train  # imported here so a torchrun parent does not load torch

    train(params)


if __name__ == "__main__":
    run_stage(main)

"""CPU threads: how much faster a training step of a small model is on all cores than on one.

The numbers behind `runtime.threads: 0` (auto) in llm/hardware.py. A 2-layer model of our default
architecture (vocab 1,024, AdamW) takes one training step at each d_model x tokens-per-step point, on
one thread and on all cores, best of a few steps each. Run it once on a free machine and once beside
other work (for example `python benchmarks/threads.py --busy 2`, which starts two spinning processes)
to see both sides of the rule.

    python benchmarks/threads.py [--steps 8] [--busy N]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from llm.config import ModelConfig
from llm.model import GPT
from llm.optim import make_optimizer

D_MODELS = (32, 64, 128, 256)
BATCHES = ((1, 32), (4, 64), (8, 128), (16, 128))  # (batch, context): 32 to 2,048 tokens a step
VOCAB = 1024


def step_seconds(d_model: int, batch: int, context: int, threads: int, steps: int) -> float:
    """Fastest of `steps` training steps (forward, backward, AdamW) on `threads` threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, d_model=d_model, num_heads=max(1, d_model // 32), num_layers=2,
                         d_ff=4 * d_model, max_seq_length=context, dropout=0.0)
    model = GPT(config)
    optimizer = make_optimizer(model, 2e-3, 0.1, (0.9, 0.95), torch.device("cpu"), optimizer="adamw",
                               muon_lr=0.02)
    tokens = torch.randint(0, VOCAB, (batch, context + 1))
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        best = min(best, time.perf_counter() - start)
    return best


def spin() -> None:
    """Keep one core busy (the 'other load' of a shared machine) until terminated."""
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per point (the fastest counts)")
    parser.add_argument("--busy", type=int, default=0, help="spinning processes to run alongside")
    args = parser.parse_args()
    cores = torch.get_num_threads()
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for process in spinners:
        process.start()
    try:
        print(f"{cores} cores, {args.busy} busy processes alongside; ms per training step")
        print(f"{'d_model':>7} {'tokens':>6} {'1 thread':>9} {f'{cores} threads':>10} {'speedup':>8}")
        for d_model in D_MODELS:
            for batch, context in BATCHES:
                one = step_seconds(d_model, batch, context, 1, args.steps)
                every = step_seconds(d_model, batch, context, cores, args.steps)
                print(f"{d_model:7d} {batch * context:6d} {one * 1e3:9.2f} {every * 1e3:10.2f} "
                      f"{one / every:7.2f}x", flush=True)
    finally:
        for process in spinners:
            process.terminate()


if __name__ == "__main__":
    main()

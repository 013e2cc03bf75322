"""Generation speed: ours with the KV cache, ours without it, and Hugging Face GPT-2's cached generate.

Same dimensions for all three (d_model 512, 6 layers, 8 heads, d_ff 2048, vocab 10000, fp32, batch 1),
greedy, exactly 200 new tokens after a 16-token prompt, in one process on the same threads; each timed
as the best of a few interleaved rounds after a warm-up round (the first place rotating from round to
round), with the median of the per-round ratios beside it, the steadier measure on a busy machine.
Checks that our tokens are the same with and without the cache. Prints a table, then one JSON line.

    python benchmarks/generate.py [--new-tokens 200] [--repeats 3] [--threads N] [--cpu-time]

Decoding one token reads every weight once (96 MB in fp32 here), so at batch 1 the time is mostly
memory traffic that every implementation pays; the rest is per-token overhead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from llm.config import ModelConfig
from llm.generate import generate
from llm.model import GPT

D_MODEL, LAYERS, HEADS, D_FF, VOCAB, CONTEXT, PROMPT = 512, 6, 8, 2048, 10000, 512, 16


def round_seconds(runs: dict[str, Callable[[], object]], repeats: int, clock=time.perf_counter
                  ) -> dict[str, list[float]]:
    """Each run's time (by `clock`) in each of `repeats` rounds (after one untimed warm-up round).

    Rounds interleave the contenders, so a change in machine load hits all of them alike, and rotate who
    goes first, so that no contender always runs right after the same one.
    """
    names, times = list(runs), {name: [] for name in runs}
    for round_index in range(repeats + 1):
        first = round_index % len(names)
        for name in names[first:] + names[:first]:
            start = clock()
            runs[name]()
            if round_index:
                times[name].append(clock() - start)
    return times


def median_ratio(slower: list[float], faster: list[float]) -> float:
    """Median over rounds of slower / faster: a speed-up that one lucky round cannot make."""
    return statistics.median(a / b for a, b in zip(slower, faster))


def hf_model() -> torch.nn.Module:
    """GPT-2 of the same shape, randomly initialised (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=D_MODEL, n_layer=LAYERS, n_head=HEADS,
                        n_inner=D_FF, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    return GPT2LMHeadModel(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time in process CPU seconds (robust on a busy machine, with --threads 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = GPT(ModelConfig(vocab_size=VOCAB, d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, d_ff=D_FF,
                           max_seq_length=CONTEXT, dropout=0.0)).eval()
    theirs = hf_model()
    prompt = torch.randint(0, VOCAB, (1, PROMPT))
    new = args.new_tokens

    def hf_run() -> None:
        with torch.inference_mode():
            out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=True,
                                  do_sample=False, max_new_tokens=new, min_new_tokens=new)
        if out.size(1) != PROMPT + new:
            raise RuntimeError(f"HF generated {out.size(1) - PROMPT} tokens, expected {new}")

    runs = {
        "ours_cache": lambda: generate(ours, prompt, new, temperature=0, use_cache=True),
        "ours_no_cache": lambda: generate(ours, prompt, new, temperature=0, use_cache=False),
        "hf_cache": hf_run,
    }
    cached = generate(ours, prompt, new, temperature=0, use_cache=True)
    identical = torch.equal(cached, generate(ours, prompt, new, temperature=0, use_cache=False))
    times = round_seconds(runs, args.repeats, time.process_time if args.cpu_time else time.perf_counter)
    results = {name: min(seconds) for name, seconds in times.items()}
    rates = {f"{name}_tok_s": round(new / seconds, 1) for name, seconds in results.items()}
    for name, seconds in results.items():
        print(f"{name:>14}: {new / seconds:8.1f} tokens/s")
    summary = {
        **rates,
        "cache_vs_hf": round(results["hf_cache"] / results["ours_cache"], 2),
        "cache_vs_hf_rounds_median": round(median_ratio(times["hf_cache"], times["ours_cache"]), 2),
        "cache_vs_no_cache": round(results["ours_no_cache"] / results["ours_cache"], 2),
        "greedy_identical_with_and_without_cache": identical,
        "new_tokens": new, "prompt_tokens": PROMPT, "threads": torch.get_num_threads(),
        "clock": "cpu" if args.cpu_time else "wall",
        "torch": torch.__version__,
    }
    print(f"ours with cache vs HF cached generate: {summary['cache_vs_hf']}x best, "
          f"{summary['cache_vs_hf_rounds_median']}x median of rounds (target >= 1.5x)")
    print(f"ours with cache vs ours without:       {summary['cache_vs_no_cache']}x (target >= 3x)")
    print(f"greedy tokens identical with and without the cache: {identical}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

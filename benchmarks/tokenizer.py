"""Tokenizer benchmark: our BPE vs HuggingFace `tokenizers` (training) and tiktoken (encoding).

    python benchmarks/tokenizer.py [CORPUS ...] [--vocab 1024 4096 10000]

CORPUS defaults to every *.txt under ../shared/data (relative to the repo root), concatenated.
For each vocab size it prints train seconds (ours, HF ByteLevel BPE, ratio), encode MB/s on one
core with a freshly loaded tokenizer (cold cache), with all cores, tiktoken's MB/s with our ranks,
HF's single-string encode MB/s, and bytes per token. Ratios are given for wall time and for CPU time
of this process (`time.process_time`, all threads), which a busy shared machine disturbs less.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tiktoken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from llm.tokenizers import BPETokenizer, load_tokenizer

_WORKER_TOKENIZER: BPETokenizer | None = None


def hf_train(text: str, vocab_size: int) -> tuple[HFTokenizer, float]:
    """HF ByteLevel BPE (GPT-2 style, 256 byte alphabet + <|endoftext|>) and its train seconds.

    HF gets the corpus as lines, its fastest input (it trains in parallel over them).
    """
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    start, cpu_start = time.perf_counter(), time.process_time()
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tok, (time.perf_counter() - start, time.process_time() - cpu_start)


def _init_worker(path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(path)


def _encode_len(chunk: str) -> int:
    return len(_WORKER_TOKENIZER.encode(chunk))


def chunks_of(text: str, count: int) -> list[str]:
    """`text` cut into `count` pieces at spaces after non-space characters (token boundaries)."""
    size, out, start = len(text) // count + 1, [], 0
    while start < len(text):
        end = text.find(" ", start + size)
        while end != -1 and text[end - 1].isspace():
            end = text.find(" ", end + 1)
        end = len(text) if end == -1 else end
        out.append(text[start:end])
        start = end
    return out


def timed(fn) -> tuple[object, tuple[float, float]]:
    """fn()'s result and its (wall, CPU) seconds."""
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    return result, (time.perf_counter() - start, time.process_time() - cpu_start)


def best_of(runs: int, fn) -> tuple[float, float]:
    """Fastest (wall, CPU) seconds of `runs` calls of fn() (noise on a shared machine only adds time)."""
    times = [timed(fn)[1] for _ in range(runs)]
    return min(t[0] for t in times), min(t[1] for t in times)


def fastest(times: list[tuple[float, float]]) -> tuple[float, float]:
    """The best wall and the best CPU time of several (wall, CPU) timings."""
    return min(t[0] for t in times), min(t[1] for t in times)


def bench(text: str, vocab_size: int, workdir: Path, runs: int) -> dict:
    """All measurements for one vocab size."""
    mb = len(text.encode("utf-8")) / 1e6
    ours_times, hf_times = [], []
    for _ in range(runs):  # interleaved, so that both see the same machine load
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok, seconds = timed(lambda: BPETokenizer.train(text, vocab_size, num_workers=1))
        ours_times.append(seconds)
        hf_tok, seconds = hf_train(text, vocab_size)
        hf_times.append(seconds)
    ours_train, hf_train_s = fastest(ours_times), fastest(hf_times)
    path = workdir / f"bpe-{vocab_size}.json"
    tok.save(path)

    enc = tiktoken.Encoding(name="ours", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks(),
                            special_tokens=tok.special_tokens)
    cold_times, tiktoken_times = [], []
    for _ in range(runs):
        ids, seconds = timed(partial(load_tokenizer(path).encode, text))  # a fresh tokenizer; load not timed
        cold_times.append(seconds)
        tiktoken_times.append(timed(lambda: enc.encode_ordinary(text))[1])
    cold, tiktoken_seconds = fastest(cold_times), fastest(tiktoken_times)
    assert enc.encode_ordinary(text) == ids, "tiktoken parity broken"
    hf_encode_seconds = best_of(runs, lambda: hf_tok.encode(text))[0]
    workers = os.cpu_count() or 1
    pieces = chunks_of(text, workers * 4)
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (str(path),)) as pool:
        start = time.perf_counter()
        total = sum(pool.map(_encode_len, pieces))
        parallel_seconds = time.perf_counter() - start
    assert total == len(ids)
    return {
        "vocab_size": tok.vocab_size, "ours_train_s": ours_train[0], "hf_train_s": hf_train_s[0],
        "train_ratio": ours_train[0] / hf_train_s[0], "ours_train_cpu_s": ours_train[1],
        "hf_train_cpu_s": hf_train_s[1], "train_cpu_ratio": ours_train[1] / hf_train_s[1],
        "ours_encode_mb_s": mb / cold[0], "ours_encode_all_cores_mb_s": mb / parallel_seconds,
        "workers": workers, "tiktoken_mb_s": mb / tiktoken_seconds[0],
        "hf_encode_mb_s": mb / hf_encode_seconds,
        "encode_ratio_vs_tiktoken": tiktoken_seconds[0] / cold[0],
        "encode_cpu_ratio_vs_tiktoken": tiktoken_seconds[1] / cold[1], "bytes_per_token": mb * 1e6 / len(ids),
    }


def main() -> None:
    """Parse arguments, run every vocab size, print a table and a final JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", nargs="*", type=Path, help="text files (default: ../shared/data/**/*.txt)")
    parser.add_argument("--vocab", nargs="+", type=int, default=[1024, 4096, 10000])
    parser.add_argument("--runs", type=int, default=3, help="timings per number; the best is kept")
    args = parser.parse_args()
    files = args.corpus or sorted((ROOT.parent / "shared" / "data").rglob("*.txt"))
    text = "".join(path.read_text(encoding="utf-8") for path in files)
    print(f"corpus: {len(files)} files, {len(text.encode('utf-8')) / 1e6:.2f} MB; cpus: {os.cpu_count()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocab:
            r = bench(text, vocab, Path(tmp), args.runs)
            results.append(r)
            print(f"vocab {vocab:>6}: train ours {r['ours_train_s']:.3f}s HF {r['hf_train_s']:.3f}s "
                  f"ratio {r['train_ratio']:.2f} (CPU {r['ours_train_cpu_s']:.3f}s / "
                  f"{r['hf_train_cpu_s']:.3f}s = {r['train_cpu_ratio']:.2f}) | encode ours "
                  f"{r['ours_encode_mb_s']:.1f} MB/s cold 1 core, "
                  f"{r['ours_encode_all_cores_mb_s']:.1f} MB/s {r['workers']} cores; tiktoken "
                  f"{r['tiktoken_mb_s']:.1f} MB/s (ours/tiktoken {r['encode_ratio_vs_tiktoken']:.2f}, CPU "
                  f"{r['encode_cpu_ratio_vs_tiktoken']:.2f}); HF {r['hf_encode_mb_s']:.1f} MB/s | "
                  f"{r['bytes_per_token']:.2f} bytes/token")
    print(json.dumps({"corpus_mb": round(len(text.encode("utf-8")) / 1e6, 3), "results": results}))


if __name__ == "__main__":
    main()

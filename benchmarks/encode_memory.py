"""Encode stage at scale: peak RSS on a generated ~200 MB corpus, and MB/s with 1 and with 2 workers.

The corpus repeats the lines of the shared corpora (tiny Shakespeare + WikiText-2 valid), shuffled anew in
each copy; in half of each copy one of `--variants` swaps of six letters makes other words, so the
tokenizer's caches keep meeting new words instead of covering the text after the first copy. The
tokenizer (byte-level BPE, or word-level with --tokenizer simple) is fitted on the shared corpora.
`encode_corpus` runs once per worker count on the same files; peak RSS is the sum over this process and
its worker processes, sampled every 0.2 s. Prints a table, then one JSON line.

    nice python benchmarks/encode_memory.py [--mb 200] [--tokenizer bpe] [--vocab-size 4096] [--variants 16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import string
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psutil

from llm.encode import encode_corpus
from llm.tokenizers import train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCES = [SHARED_DATA / "tinyshakespeare" / "input.txt", SHARED_DATA / "wikitext-2" / "valid.txt"]


class PeakRss:
    """Context manager sampling the RSS of this process plus its children in a thread; `.peak_mb` after."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += child.memory_info().rss
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of this process (RUSAGE_SELF) or of its finished children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def write_corpus(path: Path, megabytes: int, variants: int, seed: int = 0) -> int:
    """Write ~`megabytes` MB of shuffled copies of the shared corpora, half of each letter-swapped; size."""
    lines = np.array([line for source in SOURCES
                      for line in source.read_text(encoding="utf-8").splitlines(keepends=True)], dtype=object)
    rng = np.random.default_rng(seed)
    swaps = [rng.choice(list(string.ascii_lowercase), size=6, replace=False) for _ in range(variants)]
    tables = [str.maketrans("".join(swap), "".join(swap[::-1])) for swap in swaps]
    target, written, copy = megabytes * 10**6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            text = "".join(lines[rng.permutation(len(lines))])
            half = text.index("\n", len(text) // 2) + 1
            text = text[:half].translate(tables[copy % variants]) + text[half:]
            f.write(text)
            written, copy = written + len(text.encode("utf-8")), copy + 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="corpus size in MB (10^6 bytes)")
    parser.add_argument("--tokenizer", choices=("bpe", "simple"), default="bpe")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--variants", type=int, default=16,
                        help="distinct letter swaps applied to half of each copy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="encode-bench-") as tmp:
        root = Path(tmp)
        raw = root / "raw"
        raw.mkdir()
        start = time.perf_counter()
        size = write_corpus(raw / "train.txt", args.mb, args.variants)
        small = SOURCES[1].read_text(encoding="utf-8")[:50_000]
        for split in ("valid", "test"):
            (raw / f"{split}.txt").write_text(small, encoding="utf-8")
        print(f"corpus: {size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
        training_text = "".join(source.read_text(encoding="utf-8") for source in SOURCES)
        train_tokenizer(args.tokenizer, training_text, args.vocab_size).save(root / "tokenizer.json")
        print(f"tokenizer: {args.tokenizer}, vocab {args.vocab_size}, fitted in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        total_bytes = size + 2 * (raw / "valid.txt").stat().st_size
        baseline_mb = psutil.Process().memory_info().rss / 2**20
        runs = {}
        for workers in (1, 2):
            cpu_parent, cpu_workers = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
            with PeakRss() as rss:
                start = time.perf_counter()
                meta = encode_corpus(raw, root / "tokenizer.json", root / f"shards-{workers}",
                                     shard_tokens=16_777_216, num_workers=workers)
                seconds = time.perf_counter() - start
            run = runs[workers] = {
                "seconds": seconds, "mb_per_s": total_bytes / 1e6 / seconds, "peak_rss_mb": rss.peak_mb,
                "parent_cpu_s": cpu_seconds(resource.RUSAGE_SELF) - cpu_parent,
                "workers_cpu_s": cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_workers,
                "tokens": sum(info["num_tokens"] for info in meta["splits"].values())}
            print(f"{workers} worker(s): {seconds:7.1f} s  {run['mb_per_s']:6.2f} MB/s  peak RSS "
                  f"{rss.peak_mb:7.1f} MB  CPU parent {run['parent_cpu_s']:.1f} s, workers "
                  f"{run['workers_cpu_s']:.1f} s  ({run['tokens']:,} tokens)", flush=True)
        one, two = root / "shards-1", root / "shards-2"
        identical = all(shard.read_bytes() == (one / shard.relative_to(two)).read_bytes()
                        for shard in two.rglob("*.npy"))
    result = {"corpus_mb": round(size / 1e6, 1), "tokenizer": args.tokenizer, "vocab_size": args.vocab_size,
              "baseline_rss_mb": round(baseline_mb, 1),
              "peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs.values()), 1),
              "mb_per_s_1_worker": round(runs[1]["mb_per_s"], 3),
              "mb_per_s_2_workers": round(runs[2]["mb_per_s"], 3),
              "speedup_2_vs_1": round(runs[2]["mb_per_s"] / runs[1]["mb_per_s"], 3),
              "parent_cpu_s": [round(runs[w]["parent_cpu_s"], 1) for w in (1, 2)],
              "workers_cpu_s": [round(runs[w]["workers_cpu_s"], 1) for w in (1, 2)],
              "identical_outputs": identical, "peak_rss_target_mb": 1024, "speedup_target": 1.6}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

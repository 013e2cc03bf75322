"""Encode stage: data/raw/{train,valid,test}.txt + data/tokenizer.json -> data/shards (npy + meta.json)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.stage import dependencies_or_exit, run_stage

with dependencies_or_exit():
    from llm.config import load_params
    from llm.encode import encode_corpus
    from llm.io import check_outputs

SHARDS = Path("data/shards")


def main() -> None:
    """Write data/shards and print one summary line per split."""
    params = load_params(sections=("encode",))
    check_outputs(folders=(SHARDS,))
    meta = encode_corpus(Path("data/raw"), Path("data/tokenizer.json"), SHARDS,
                         shard_tokens=params.encode.shard_tokens, num_workers=params.runtime.num_workers,
                         progress=params.runtime.progress)
    for split, info in meta["splits"].items():
        print(f"{split}: {info['num_tokens']:,} tokens ({meta['dtype']}) in {len(info['shards'])} shard(s) "
              f"from {info['num_bytes']:,} bytes, {info['num_bytes'] / info['num_tokens']:.2f} bytes/token")


if __name__ == "__main__":
    run_stage(main)

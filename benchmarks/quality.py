"""Quality per compute: validation bits per byte of model variants after a fixed wall-clock training budget.

Tiny Shakespeare, our byte-level BPE (vocab 1024) fitted on the first 90%, validation = the last 10%,
scored on the whole split in non-overlapping windows. Each variant trains for --seconds with AdamW and a
time-based warmup + cosine schedule, so cheaper variants get more steps, as they would in a real budget.

    python benchmarks/quality.py --seconds 55 --variants rope,rmsnorm,relu2 learned,layernorm,gelu
    python benchmarks/quality.py --seconds 55 --optimizers adamw muon --layers 2 --batch 16 --lr 4e-3

Variants are position,norm,activation[,untied][,bias]; every variant runs with every optimizer.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from llm.config import ModelConfig
from llm.model import GPT
from llm.optim import make_optimizer

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def encode_corpus(path: Path, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(train ids, valid ids, vocab size, valid UTF-8 bytes); BPE fitted on the train part only."""
    from llm.tokenizers import BPETokenizer

    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train_text, valid_text = text[:cut], text[cut:]
    tokenizer = BPETokenizer.train(train_text, vocab_size=vocab_size)
    train = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    valid = torch.tensor(tokenizer.encode(valid_text), dtype=torch.long)
    return train, valid, tokenizer.vocab_size, len(valid_text.encode("utf-8"))


def parse_variant(text: str) -> dict:
    """'rope,rmsnorm,relu2[,untied][,bias]' -> ModelConfig overrides."""
    position, norm, activation, *flags = text.split(",")
    return dict(position=position, norm=norm, activation=activation, tie_weights="untied" not in flags,
                bias="bias" in flags)


@torch.no_grad()
def valid_bits_per_byte(model: GPT, valid: torch.Tensor, num_bytes: int, seq: int, batch: int) -> float:
    """Summed next-token cross-entropy over the whole split, in bits, divided by its UTF-8 bytes."""
    model.eval()
    windows = valid[: (len(valid) - 1) // seq * seq + 1]
    inputs = windows[:-1].view(-1, seq)
    targets = windows[1:].view(-1, seq)
    total = 0.0
    for i in range(0, len(inputs), batch):
        logits = model(inputs[i:i + batch])
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[i:i + batch].flatten(),
                                                   reduction="sum").item()
    tail = valid[len(windows) - 1:]  # the last partial window
    if len(tail) > 1:
        logits = model(tail[None, :-1])
        total += torch.nn.functional.cross_entropy(logits[0], tail[1:], reduction="sum").item()
    model.train()
    return total / math.log(2) / num_bytes


def train_for(config: ModelConfig, train: torch.Tensor, seconds: float, batch: int, lr: float,
              optimizer_name: str = "adamw", muon_lr: float = 0.02, clock=time.perf_counter,
              warmup_fraction: float = 0.05, seed: int = 1337) -> tuple[GPT, int]:
    """Train on random windows for `seconds` of `clock`; lr follows warmup + cosine over elapsed time."""
    torch.manual_seed(seed)
    model = GPT(config)
    optimizer = make_optimizer(model, lr=lr, weight_decay=0.1, betas=(0.9, 0.95), device="cpu",
                               optimizer=optimizer_name, muon_lr=muon_lr)
    seq = config.max_seq_length
    start, steps = clock(), 0
    while (elapsed := clock() - start) < seconds:
        progress = elapsed / seconds
        scale = progress / warmup_fraction if progress < warmup_fraction else \
            0.1 + 0.45 * (1 + math.cos(math.pi * (progress - warmup_fraction) / (1 - warmup_fraction)))
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * scale
        offsets = torch.randint(0, len(train) - seq - 1, (batch,))
        chunk = torch.stack([train[o:o + seq + 1] for o in offsets])
        loss = model(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    return model, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["rope,layernorm,relu2", "learned,layernorm,gelu"])
    parser.add_argument("--optimizers", nargs="+", default=["muon"], choices=["muon", "adamw"])
    parser.add_argument("--muon-lr", type=float, default=0.02, help="Muon's peak rate (train.muon_lr)")
    parser.add_argument("--seconds", type=float, default=55.0)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="budget in process CPU seconds, not wall time (fair on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train, valid, vocab, valid_bytes = encode_corpus(CORPUS, args.vocab)
    print(f"train {len(train):,} tokens, valid {len(valid):,} tokens / {valid_bytes:,} bytes, vocab {vocab}, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = {}
    clock = time.process_time if args.cpu_time else time.perf_counter
    for variant in args.variants:
        config = ModelConfig(vocab_size=vocab, d_model=args.d_model, num_heads=args.heads,
                             num_layers=args.layers, d_ff=args.d_ff, max_seq_length=args.seq, dropout=0.0,
                             **parse_variant(variant))
        for optimizer in args.optimizers:
            model, steps = train_for(config, train, args.seconds, args.batch, args.lr, optimizer,
                                     args.muon_lr, clock)
            bpb = valid_bits_per_byte(model, valid, valid_bytes, args.seq, batch=32)
            name = f"{variant} {optimizer}"
            results[name] = {"valid_bpb": round(bpb, 4), "steps": steps}
            print(f"  {name:38s} {steps:5d} steps in {args.seconds:.0f} s  valid {bpb:.4f} bits/byte",
                  flush=True)
    print(json.dumps({**{k: v for k, v in vars(args).items() if k != "variants"}, "results": results}))


if __name__ == "__main__":
    main()

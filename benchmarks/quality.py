"""Quality per compute: validation bits per byte of model variants after a fixed training budget.

Tiny Shakespeare, our byte-level BPE (vocab 1024) fitted on the first 90%, validation = the last 10%,
scored on the whole split in non-overlapping windows (in fp32). Each variant trains on random windows
with a warmup + cosine schedule over its budget: --seconds of wall (or --cpu-time) time, so cheaper
variants get more steps as they would in a real budget, or exactly --steps steps, which a busy machine
cannot distort (tune with steps; time the steps a budget buys on a quiet machine).
Defaults are the README's CPU recommendation: the 2-layer d_model 128 model, Muon, runtime.precision
and runtime.threads auto (bf16 on CPUs with native bf16, one thread for a model this small).

    python benchmarks/quality.py                          # 55 s of training per run, as the README table
    python benchmarks/quality.py --steps 900 --seeds 1 2 3 --precisions fp32 bf16   # bf16 vs fp32 loss
    python benchmarks/quality.py --variants rope,rmsnorm,relu2 learned,layernorm,gelu --optimizers adamw

Variants are position,norm,activation[,untied][,bias]; every variant runs with every optimizer,
precision and seed. The last line is JSON.
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
from llm.hardware import autocast, keep_freed_memory, resolve_precision, resolve_threads
from llm.model import GPT
from llm.optim import make_optimizer

CPU = torch.device("cpu")

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


def train_for(config: ModelConfig, train: torch.Tensor, batch: int, lr: float, *, seconds: float = 0.0,
              steps: int = 0, optimizer_name: str = "muon", muon_lr: float = 0.02, precision: str = "fp32",
              clock=time.perf_counter, warmup_fraction: float = 0.05, min_lr_fraction: float = 0.1,
              weight_decay: float = 0.1, seed: int = 1337) -> tuple[GPT, int, float]:
    """Train on random windows for `steps` steps, or else `seconds` of `clock`; the rate warms up over
    the first warmup_fraction of the budget, then follows a cosine down to min_lr_fraction of the peak.
    Returns the model, the steps taken and the seconds of `clock` they took."""
    torch.manual_seed(seed)
    model = GPT(config)
    optimizer = make_optimizer(model, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), device="cpu",
                               optimizer=optimizer_name, muon_lr=muon_lr)
    seq = config.max_seq_length
    start, step = clock(), 0
    while (progress := step / steps if steps else (clock() - start) / seconds) < 1:
        if progress < warmup_fraction:
            scale = progress / warmup_fraction
        else:
            cosine = 0.5 * (1 + math.cos(math.pi * (progress - warmup_fraction) / (1 - warmup_fraction)))
            scale = min_lr_fraction + (1 - min_lr_fraction) * cosine
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * scale
        offsets = torch.randint(0, len(train) - seq - 1, (batch,))
        chunk = torch.stack([train[o:o + seq + 1] for o in offsets])
        with autocast(precision, CPU):
            loss = model(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
    return model, step, clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["rope,layernorm,relu2"])
    parser.add_argument("--optimizers", nargs="+", default=["muon"], choices=["muon", "adamw"])
    parser.add_argument("--precisions", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16"],
                        help="training autocast precision (runtime.precision); auto as the trainer picks it")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1337])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, default=55.0, help="training budget per run")
    budget.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=4e-3, help="AdamW's peak rate (train.learning_rate)")
    parser.add_argument("--muon-lr", type=float, default=0.02, help="Muon's peak rate (train.muon_lr)")
    parser.add_argument("--min-lr-fraction", type=float, default=0.1, help="final rate / peak rate")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: auto, as runtime.threads)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="budget in process CPU seconds, not wall time (fair on a busy machine)")
    args = parser.parse_args()
    keep_freed_memory()  # as the trainer does on a CPU
    train, valid, vocab, valid_bytes = encode_corpus(CORPUS, args.vocab)
    results = {}
    clock = time.process_time if args.cpu_time else time.perf_counter
    for variant in args.variants:
        config = ModelConfig(vocab_size=vocab, d_model=args.d_model, num_heads=args.heads,
                             num_layers=args.layers, d_ff=args.d_ff, max_seq_length=args.seq, dropout=0.0,
                             **parse_variant(variant))
        torch.set_num_threads(resolve_threads(args.threads, GPT(config).num_params(),
                                               args.batch * args.seq * args.d_model ** 2))
        print(f"train {len(train):,} tokens, valid {len(valid):,} tokens / {valid_bytes:,} bytes, "
              f"vocab {vocab}, {torch.get_num_threads()} threads", flush=True)
        for optimizer in args.optimizers:
            for precision in (resolve_precision(p, CPU, args.d_model) for p in args.precisions):
                for seed in args.seeds:
                    model, steps, seconds = train_for(
                        config, train, args.batch, args.lr, seconds=args.seconds, steps=args.steps,
                        optimizer_name=optimizer, muon_lr=args.muon_lr, precision=precision, clock=clock,
                        min_lr_fraction=args.min_lr_fraction, weight_decay=args.weight_decay, seed=seed)
                    bpb = valid_bits_per_byte(model, valid, valid_bytes, args.seq, batch=32)
                    name = f"{variant} {optimizer} {precision} seed {seed}"
                    results[name] = {"valid_bpb": round(bpb, 4), "steps": steps, "seconds": round(seconds, 1),
                                     "ms_per_step": round(1e3 * seconds / steps, 1)}
                    print(f"  {name:48s} {steps:5d} steps in {seconds:5.1f} s ({1e3 * seconds / steps:.1f} "
                          f"ms/step)  valid {bpb:.4f} bits/byte", flush=True)
    print(json.dumps({**{k: v for k, v in vars(args).items() if k != "variants"}, "results": results}))


if __name__ == "__main__":
    main()

"""GPU throughput of a GPT-2-small-shaped model (bf16 + torch.compile): tokens/s, MFU, peak memory,
and a loss-parity check of bf16 autocast against fp32 on a small model.

    python benchmarks/gpu.py            # on a CUDA machine; under 5 minutes, no DVC needed
    python benchmarks/gpu.py --smoke    # tiny shapes, runs anywhere (CPU), to check the script works
    python benchmarks/gpu.py --optimizer muon   # the trainer's default (MFU counts model FLOPs only)

The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from llm.config import ModelConfig
from llm.hardware import autocast, mfu, peak_flops, resolve_device, resolve_precision
from llm.model import GPT
from llm.optim import make_optimizer

GPT2_SMALL = dict(vocab_size=50304, d_model=768, num_heads=12, num_layers=12, d_ff=3072, max_seq_length=1024)
PARITY = dict(vocab_size=512, d_model=128, num_heads=4, num_layers=2, d_ff=512, max_seq_length=128)
SMOKE = dict(vocab_size=256, d_model=64, num_heads=4, num_layers=2, d_ff=256, max_seq_length=64)


def train_steps(model: torch.nn.Module, batches: list[torch.Tensor], precision: str, device: torch.device,
                lr: float = 1e-3, optimizer_name: str = "adamw") -> tuple[list[float], list[float]]:
    """Train one step per batch; returns (losses, step seconds)."""
    raw = getattr(model, "_orig_mod", model)  # a compiled model's parameters are the original's
    optimizer = make_optimizer(raw, lr=lr, weight_decay=0.1, betas=(0.9, 0.95), device=device,
                               optimizer=optimizer_name)
    losses, seconds = [], []
    for batch in batches:
        start = time.perf_counter()
        with autocast(precision, device):
            loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() synchronises, so the step time is complete
        seconds.append(time.perf_counter() - start)
    return losses, seconds


def random_batches(shape: dict, batch_size: int, count: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, shape["vocab_size"], (batch_size, shape["max_seq_length"] + 1),
                          generator=generator).to(device) for _ in range(count)]


def throughput(shape: dict, batch_size: int, steps: int, precision: str, compile_model: bool,
               device: torch.device, optimizer_name: str) -> dict:
    """Tokens/s (median step after warm-up), MFU and peak memory of training `shape` at `precision`."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**shape, dropout=0.0)).to(device)
    flops_per_token = model.flops_per_token()
    if compile_model:
        model = torch.compile(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup = 3
    batches = random_batches(shape, batch_size, warmup + steps, device)
    _, seconds = train_steps(model, batches, precision, device, optimizer_name=optimizer_name)
    step = sorted(seconds[warmup:])[len(seconds[warmup:]) // 2]
    tokens_per_sec = batch_size * shape["max_seq_length"] / step
    util = mfu(tokens_per_sec, flops_per_token, device, precision)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"tokens_per_sec": round(tokens_per_sec, 1), "step_ms": round(step * 1e3, 2),
            "mfu": None if util is None else round(util, 4),
            "peak_memory_gib": None if peak_mem is None else round(peak_mem, 2),
            "compile_s": round(seconds[0], 1), "flops_per_token": flops_per_token}


def loss_parity(shape: dict, precision: str, device: torch.device, steps: int = 5) -> dict:
    """Same init, same batches: the low-precision losses stay within ~1e-2 relative of fp32's."""
    runs = {}
    for p in ("fp32", precision):
        torch.manual_seed(0)
        model = GPT(ModelConfig(**shape, dropout=0.0)).to(device)
        runs[p], _ = train_steps(model, random_batches(shape, 8, steps, device), p, device)
    worst = max(abs(a - b) / abs(a) for a, b in zip(runs["fp32"], runs[precision]))
    return {"fp32_losses": runs["fp32"], f"{precision}_losses": runs[precision],
            "max_rel_diff": round(worst, 5), "parity_ok": worst < 1e-2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script on CPU")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    args = parser.parse_args()
    device = resolve_device("auto")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 parity baseline on tensor cores (TF32)
        torch.backends.cudnn.allow_tf32 = True
    precision = resolve_precision("bf16" if device.type in ("cuda", "cpu") else "auto", device)
    shape, batch_size, steps = (SMOKE, 2, 3) if args.smoke else (GPT2_SMALL, args.batch_size, args.steps)
    compile_model = not args.no_compile and device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"device {name}, precision {precision}, compile {compile_model}, "
          f"peak FLOP/s {peak_flops(device, precision)}")
    result = {"device": name, "precision": precision, "compile": compile_model, "batch_size": batch_size,
              "optimizer": args.optimizer,
              **throughput(shape, batch_size, steps, precision, compile_model, device, args.optimizer)}
    print(f"throughput: {result['tokens_per_sec']:,.0f} tok/s, {result['step_ms']} ms/step, "
          f"MFU {result['mfu']}, peak memory {result['peak_memory_gib']} GiB")
    parity = loss_parity(SMOKE if args.smoke else PARITY, precision, device)
    print(f"loss parity fp32 vs {precision}: max relative difference {parity['max_rel_diff']} "
          f"({'ok' if parity['parity_ok'] else 'FAILED'})")
    print(json.dumps({**result, **parity}))


if __name__ == "__main__":
    main()

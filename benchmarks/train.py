"""Training-step throughput of our GPT vs HuggingFace GPT2LMHeadModel with identical dimensions.

A step is forward, backward, AdamW step and zero_grad. All models run in this process with the same
threads; steps are interleaved (one step of each model per round) and each model's best step time is
kept, so background load hits every model alike. Ours uses make_optimizer (what the trainer runs).

    python benchmarks/train.py                 # configs L and S, fp32 and bf16 autocast
    python benchmarks/train.py --configs L --rounds 8
    python benchmarks/train.py --no-compile   # skip the torch.compile'd model (compiling takes ~15-60 s)

Prints a table and ratios; the last line is JSON. On CUDA it also prints MFU.
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
from llm.hardware import autocast, mfu, resolve_device
from llm.model import GPT
from llm.optim import make_optimizer

CONFIGS = {  # name: (model shape, batch size)
    "L": (dict(vocab_size=10000, d_model=512, num_layers=6, num_heads=8, d_ff=2048, max_seq_length=256), 8),
    "S": (dict(vocab_size=65, d_model=128, num_layers=4, num_heads=4, d_ff=512, max_seq_length=64), 12),
}
GPT2_EQUIVALENT = dict(position="learned", norm="layernorm", activation="gelu", bias=True, tie_weights=True)
VARIANTS = {"ours": {}, "ours-gpt2-variant": GPT2_EQUIVALENT}


def hf_gpt2(shape: dict) -> torch.nn.Module:
    """transformers' GPT2LMHeadModel with our dimensions and no dropout (SDPA attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=shape["vocab_size"], n_positions=shape["max_seq_length"],
                        n_embd=shape["d_model"], n_layer=shape["num_layers"], n_head=shape["num_heads"],
                        n_inner=shape["d_ff"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "sdpa"  # transformers' fastest attention on CPU and GPU
    return GPT2LMHeadModel(config)


class Runner:
    """One model + optimizer + precision; step() runs one timed training step."""

    def __init__(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: str,
                 device: torch.device, hf: bool, flops_per_token: float):
        self.name, self.model, self.optimizer, self.precision = name, model.train(), optimizer, precision
        self.device, self.hf, self.flops_per_token = device, hf, flops_per_token
        self.times: list[float] = []

    clock = staticmethod(time.perf_counter)  # main() may switch to process CPU time

    def step(self, idx: torch.Tensor, targets: torch.Tensor) -> float:
        """One forward/backward/AdamW/zero_grad step; records and returns its wall time."""
        sync(self.device)
        start = self.clock()
        with autocast(self.precision, self.device):
            # HF shifts the labels itself; ours takes the next-token targets
            loss = self.model(input_ids=idx, labels=idx).loss if self.hf else \
                self.model(idx, targets)  # as the trainer calls it
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        self.times.append(self.clock() - start)
        return self.times[-1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_runners(config_name: str, precisions: list[str], device: torch.device, compile_too: bool
                  ) -> list[Runner]:
    shape, _ = CONFIGS[config_name]
    runners = []
    for precision in precisions:
        variants = [(label, overrides, False) for label, overrides in VARIANTS.items()]
        if compile_too:  # what runtime.compile: true trains with
            variants.insert(1, ("ours+compile", {}, True))
        for label, overrides, compiled in variants:
            torch.manual_seed(0)
            model = GPT(ModelConfig(**shape, dropout=0.0, **overrides)).to(device)
            optimizer = make_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), device=device)
            runners.append(Runner(f"{label} {precision}", torch.compile(model) if compiled else model,
                                  optimizer, precision, device, False, model.flops_per_token()))
        torch.manual_seed(0)
        hf = hf_gpt2(shape).to(device)
        flops = GPT(ModelConfig(**shape, dropout=0.0, **GPT2_EQUIVALENT)).flops_per_token()
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
        runners.append(Runner(f"hf-gpt2 {precision}", hf, hf_opt, precision, device, True, flops))
    return runners


def bench_config(config_name: str, precisions: list[str], rounds: int, device: torch.device,
                 compile_too: bool) -> dict:
    """Interleaved best-of-`rounds` step times for every runner of one config; returns tokens/s by name."""
    shape, batch = CONFIGS[config_name]
    runners = build_runners(config_name, precisions, device, compile_too)
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, shape["vocab_size"], (batch, shape["max_seq_length"] + 1), generator=generator)
    idx, targets = data[:, :-1].to(device), data[:, 1:].to(device)
    for runner in runners:  # warm-up: allocator, kernels, optimizer state, torch.compile
        runner.step(idx, targets)
        runner.step(idx, targets)
        runner.times.clear()
    for _ in range(rounds):
        for runner in runners:
            runner.step(idx, targets)
    tokens = batch * shape["max_seq_length"]
    result = {}
    print(f"\nconfig {config_name}: {shape}, batch {batch}, {tokens} tokens/step, best of {rounds}, "
          f"{torch.get_num_threads()} threads, {device}")
    hf_fp32 = None
    for runner in runners:
        tps = tokens / min(runner.times)
        result[runner.name] = tps
        if runner.name == "hf-gpt2 fp32":
            hf_fp32 = tps
    for runner in runners:
        tps = result[runner.name]
        ratio = f"{tps / hf_fp32:5.2f}x HF fp32" if hf_fp32 else ""
        util = mfu(tps, runner.flops_per_token, device, runner.precision)
        util_text = f"  MFU {util:6.1%}" if util is not None else ""
        print(f"  {runner.name:24s} {tps:10,.0f} tok/s  {min(runner.times) * 1e3:8.1f} ms/step  {ratio}"
              f"{util_text}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["L", "S"], choices=list(CONFIGS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per model (best one kept)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time steps in process CPU seconds (robust on a busy machine, with --threads 1)")
    args = parser.parse_args()
    if args.cpu_time:
        Runner.clock = staticmethod(time.process_time)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    summary = {}
    for name in args.configs:
        result = bench_config(name, args.precisions, args.rounds, device, not args.no_compile)
        hf = result.get("hf-gpt2 fp32")
        for runner_name, tps in result.items():
            key = f"{name}_{runner_name.replace(' ', '_').replace('-', '_')}"
            summary[f"{key}_tok_s"] = round(tps, 1)
            if hf:
                summary[f"{key}_vs_hf_fp32"] = round(tps / hf, 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

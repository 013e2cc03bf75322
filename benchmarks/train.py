"""Training-step throughput of our GPT vs nanoGPT and Hugging Face GPT-2, same dimensions, same process.

A step is forward, backward, AdamW step and zero_grad; every model uses torch's fused AdamW (ours through
make_optimizer, what the trainer runs), dropout 0 and the same threads. Steps are interleaved (one step
of each model per round, the first place rotating from round to round, since on a shared machine the
order alone moved an A/A comparison by up to 1%), so a change in machine load hits every model alike;
each model's best step is its speed, and the quartiles of the per-round ratios show the noise (their
median is the steadier measure on a busy machine).

Runners: `ours` (the default architecture: RoPE, ReLU^2, LayerNorm, no bias), `ours-nanogpt-arch`
(nanoGPT's: learned positions, GELU, no bias), `nanogpt` (its model.py, imported from
../shared/peers/nanogpt_model.py when that file exists; never copied here), `hf-gpt2`
(transformers' GPT2LMHeadModel, when installed) and optionally `ours+compile`.

    python benchmarks/train.py                                 # cases L:fp32 L:bf16 S:fp32 Q:fp32
    python benchmarks/train.py --cases S:fp32 Q:fp32 --rounds 20 --threads 1 --cpu-time
    python benchmarks/train.py --compile                       # also time torch.compile'd ours

On a machine shared with other jobs use `--threads 1 --cpu-time` (process CPU time is not inflated by
waiting for a core). Prints a table per case; the last line is JSON. On CUDA it also prints MFU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from llm.config import ModelConfig
from llm.hardware import autocast, keep_freed_memory, mfu, resolve_device
from llm.model import GPT
from llm.optim import make_optimizer

NANOGPT = Path(__file__).resolve().parents[2] / "shared" / "peers" / "nanogpt_model.py"
CONFIGS = {  # name: (model shape, batch size)
    "L": (dict(vocab_size=10000, d_model=512, num_layers=6, num_heads=8, d_ff=2048, max_seq_length=256), 8),
    "S": (dict(vocab_size=65, d_model=128, num_layers=4, num_heads=4, d_ff=512, max_seq_length=64), 12),
    "Q": (dict(vocab_size=1024, d_model=128, num_layers=2, num_heads=4, d_ff=512, max_seq_length=128), 16),
}
NANOGPT_ARCH = dict(position="learned", norm="layernorm", activation="gelu", bias=False, tie_weights=True)
LR, BETAS, WEIGHT_DECAY = 3e-4, (0.9, 0.95), 0.1


def decay_groups(model: torch.nn.Module) -> list[dict]:
    """nanoGPT's configure_optimizers grouping: weight decay on >= 2-D tensors only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def fused_adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(decay_groups(model), lr=LR, betas=BETAS, fused=device.type in ("cuda", "cpu"))


def load_nanogpt():
    """nanoGPT's model module from ../shared/peers, or None when it is not there."""
    if not NANOGPT.is_file():
        return None
    spec = importlib.util.spec_from_file_location("nanogpt_model", NANOGPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nanogpt_model(module, shape: dict) -> torch.nn.Module:
    config = module.GPTConfig(block_size=shape["max_seq_length"], vocab_size=shape["vocab_size"],
                              n_layer=shape["num_layers"], n_head=shape["num_heads"], n_embd=shape["d_model"],
                              dropout=0.0, bias=False)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        return module.GPT(config)


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

    clock = staticmethod(time.perf_counter)  # main() may switch to process CPU time

    def __init__(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, kind: str,
                 flops_per_token: float):
        self.name, self.model, self.optimizer, self.kind = name, model.train(), optimizer, kind
        self.flops_per_token = flops_per_token
        self.times: list[float] = []

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.kind == "hf":  # HF shifts the labels itself
            return self.model(input_ids=idx, labels=idx).loss
        if self.kind == "nanogpt":
            return self.model(idx, targets)[1]
        return self.model(idx, targets)  # as the trainer calls ours

    def step(self, idx: torch.Tensor, targets: torch.Tensor, precision: str, device: torch.device) -> None:
        """One forward/backward/AdamW/zero_grad step; records its time."""
        sync(device)
        start = self.clock()
        with autocast(precision, device):
            loss = self.loss(idx, targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(device)
        self.times.append(self.clock() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_runners(shape: dict, device: torch.device, compile_too: bool) -> list[Runner]:
    """Every available contender for one model shape, each initialised from seed 0."""
    flops = GPT(ModelConfig(**shape, dropout=0.0, **NANOGPT_ARCH)).flops_per_token()
    runners = []
    variants = [("ours", {}, False), ("ours-nanogpt-arch", NANOGPT_ARCH, False)]
    if compile_too:  # what runtime.compile: true trains with
        variants.append(("ours+compile", {}, True))
    for label, overrides, compiled in variants:
        torch.manual_seed(0)
        model = GPT(ModelConfig(**shape, dropout=0.0, **overrides)).to(device)
        optimizer = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, device=device)
        runners.append(Runner(label, torch.compile(model) if compiled else model, optimizer, "ours",
                              model.flops_per_token()))
    nanogpt = load_nanogpt()
    if nanogpt is not None:
        torch.manual_seed(0)
        model = nanogpt_model(nanogpt, shape).to(device)
        runners.append(Runner("nanogpt", model, fused_adamw(model, device), "nanogpt", flops))
    if importlib.util.find_spec("transformers") is not None:
        torch.manual_seed(0)
        model = hf_gpt2(shape).to(device)
        runners.append(Runner("hf-gpt2", model, fused_adamw(model, device), "hf", flops))
    return runners


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q1, median, q3


def bench_case(config_name: str, precision: str, rounds: int, device: torch.device, compile_too: bool
               ) -> dict:
    """Interleaved steps of every runner; prints a table and returns tokens/s and ratios."""
    shape, batch = CONFIGS[config_name]
    runners = build_runners(shape, device, compile_too)
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, shape["vocab_size"], (batch, shape["max_seq_length"] + 1), generator=generator)
    idx, targets = data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)
    for runner in runners:  # warm-up: allocator, kernels, optimizer state, torch.compile
        for _ in range(2):
            runner.step(idx, targets, precision, device)
        runner.times.clear()
    for round_index in range(rounds):
        first = round_index % len(runners)
        for runner in runners[first:] + runners[:first]:
            runner.step(idx, targets, precision, device)
    tokens = batch * shape["max_seq_length"]
    by_name = {runner.name: runner for runner in runners}
    clock = "CPU" if Runner.clock is time.process_time else "wall"
    print(f"\n{config_name} {precision}: {shape}, batch {batch}, {tokens} tokens/step, best of {rounds}, "
          f"{torch.get_num_threads()} threads, {device}, {clock} time")
    result = {}
    for runner in runners:
        tps = tokens / min(runner.times)
        result[f"{runner.name}_tok_s"] = round(tps, 1)
        line = f"  {runner.name:18s} {tps:10,.0f} tok/s {min(runner.times) * 1e3:9.1f} ms/step"
        util = mfu(tps, runner.flops_per_token, device, precision)
        if util is not None:
            line += f"  MFU {util:6.1%}"
        for peer in ("nanogpt", "hf-gpt2"):
            if runner.kind == "ours" and peer in by_name:
                other = by_name[peer]
                ratio = min(other.times) / min(runner.times)
                q1, median, q3 = quartiles([a / b for a, b in zip(other.times, runner.times)])
                result[f"{runner.name}_vs_{peer}"] = round(ratio, 3)
                result[f"{runner.name}_vs_{peer}_rounds_q1_median_q3"] = [round(q1, 3), round(median, 3),
                                                                          round(q3, 3)]
                line += f"  {ratio:5.2f}x {peer} (rounds {q1:.2f}/{median:.2f}/{q3:.2f})"
        print(line)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["L:fp32", "L:bf16", "S:fp32", "Q:fp32"],
                        help="CONFIG:PRECISION pairs; configs " + ", ".join(CONFIGS) + "; fp32 or bf16")
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per model (best one kept)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd ours (~15-60 s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time steps in process CPU seconds (robust on a busy machine, with --threads 1)")
    args = parser.parse_args()
    if args.cpu_time:
        Runner.clock = staticmethod(time.process_time)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does; process-wide, so every contender gets it
    if not NANOGPT.is_file():
        print(f"(no {NANOGPT.name} in ../shared/peers: the nanogpt column is skipped)")
    summary = {"threads": torch.get_num_threads(), "clock": "cpu" if args.cpu_time else "wall",
               "rounds": args.rounds, "torch": torch.__version__}
    for case in args.cases:
        config_name, _, precision = case.partition(":")
        if config_name not in CONFIGS or precision not in ("fp32", "bf16"):
            parser.error(f"--cases {case!r}: use CONFIG:PRECISION with CONFIG in {', '.join(CONFIGS)}, "
                         "PRECISION fp32 or bf16")
        for key, value in bench_case(config_name, precision, args.rounds, device, args.compile).items():
            summary[f"{config_name}_{precision}_{key.replace('-', '_').replace('+', '_')}"] = value
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Device, precision and CPU thread choice, autocast, and model FLOPs utilisation (MFU) from peak FLOPs."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import sys

import torch

from llm.config import DEVICES, PRECISIONS
from llm.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# precision: auto on a CPU with native bf16 (AMX or AVX512-BF16) picks bf16 from this d_model up. Measured
# on a 2-core Xeon with AMX, one thread, a training step of the default architecture under bf16 autocast
# vs fp32 (process CPU time, best of 10): d_model 32: 0.50x as fast, 64: 0.88x, 96: 1.12x,
# 128: 1.45x (benchmarks/train.py config S), 256: 2.17x, 512: 2.47x (config L). Below it, casts and
# per-op overhead outweigh the faster matmuls.
CPU_BF16_MIN_D_MODEL = 128
# runtime.threads: 0 (auto) uses all cores for a model of at least SMALL_MODEL_PARAMS parameters, or when
# one matmul of a forward pass (rows x d_model x d_model multiply-adds) is at least PARALLEL_MIN_WORK;
# else one thread. Measured with benchmarks/threads.py on a 2-core Xeon, a training step at 2 threads vs
# 1 with the cores free: 1.03-1.20x as fast up to 1M multiply-adds, 1.5-1.9x from 4M up (d_model 128 at
# 2,048 tokens a step: 103 -> 58 ms). With two busy processes beside it (--busy 2), 13 of the 16 points
# ran slower at 2 threads, 0.11-0.94x as fast, and one 0.01x (a 3 ms step of d_model 32 took 272 ms).
# So work that gains little from a second thread never risks the stall, larger work takes the
# 1.5-1.9x, and a shared machine sets runtime.threads: 1. At 24M parameters (config L) 2 threads
# trained 2.0x faster and decoded (memory-bound, one row) 1.6x faster. The rule looks only at the model
# and the batch, never at the machine's load, because the thread count changes the last bits of a
# matmul and a run must be reproducible.
SMALL_MODEL_PARAMS = 10_000_000
PARALLEL_MIN_WORK = 4_000_000
# glibc's malloc returns freed memory at the top of the heap to the OS, and maps big blocks fresh each
# time, so a CPU training step that frees and reallocates the same activations page-faults them back in
# every step: 5,400 minor faults a step for the CPU recipe's model (d_model 128, 16 x 128 tokens, bf16,
# 2 threads; resource.getrusage), 43.5 ms a step. Keeping freed memory (these mallopt settings) cut it
# to ~330-400 faults a step over the first 300 steps of a fresh process (~11 a step once warm) and 35-38
# ms a step, with bit-identical results (benchmarks/quality.py --steps 300). The cost: the process keeps
# up to M_TRIM_THRESHOLD of freed memory.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters, from glibc's malloc.h
KEEP_FREED_MEMORY = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 256 << 20))
DEFAULT_THREADS = torch.get_num_threads()  # torch's choice at import: the physical cores
CPUINFO = "/proc/cpuinfo"  # Linux's CPU flags, read when torch cannot report them (torch < 2.8)

# Dense (no 2:4 sparsity) peak FLOP/s per GPU from NVIDIA datasheets: half = bf16/fp16 tensor cores with
# fp32 accumulate (what torch.autocast uses), tf32 = fp32 matmuls on tensor cores, fp32 = plain CUDA cores.
# None = the precision has no hardware support. Matched against torch.cuda.get_device_name, first hit wins,
# so more specific names come first (GH200 before H200, A100 before A10, L40S before L40 before L4).
PEAK_FLOPS: list[tuple[str, dict[str, float | None]]] = [
    (r"GH200", {"half": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    (r"H200.*NVL", {"half": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"H200", {"half": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    (r"H100.*NVL", {"half": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"H100.*PCIE", {"half": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"H100", {"half": 989e12, "tf32": 494.5e12, "fp32": 67e12}),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"H800", {"half": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    (r"B200", {"half": 2250e12, "tf32": 1100e12, "fp32": 80e12}),
    (r"A100", {"half": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"A800", {"half": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"\bA10G\b", {"half": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
    (r"\bA10\b", {"half": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"\bA40\b", {"half": 149.7e12, "tf32": 74.8e12, "fp32": 37.4e12}),
    (r"A6000", {"half": 154.8e12, "tf32": 77.4e12, "fp32": 38.7e12}),
    (r"L40S", {"half": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bL40\b", {"half": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    (r"\bL4\b", {"half": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"RTX 4090", {"half": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"RTX 3090", {"half": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    (r"V100", {"half": 125e12, "bf16": None, "tf32": None, "fp32": 15.7e12}),
    (r"\bT4\b", {"half": 65e12, "bf16": None, "tf32": None, "fp32": 8.1e12}),
]


def resolve_device(name: str) -> torch.device:
    """runtime.device -> torch.device; auto: CUDA (cuda:LOCAL_RANK under torchrun), else MPS, else CPU."""
    if name not in DEVICES:
        raise ConfigError(f"runtime.device = {name!r}: must be one of {', '.join(DEVICES)}")
    has_cuda = torch.cuda.is_available()
    has_mps = torch.backends.mps.is_available()
    if name == "cuda" and not has_cuda:
        raise ConfigError("runtime.device = 'cuda': no CUDA GPU is visible to torch here; "
                          "use device: auto or cpu (or install a CUDA build of torch)")
    if name == "mps" and not has_mps:
        raise ConfigError("runtime.device = 'mps': Apple MPS is not available here; use device: auto or cpu")
    if name == "cuda" or (name == "auto" and has_cuda):
        local_rank = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local_rank)) if local_rank is not None else torch.device("cuda")
    if name == "mps" or (name == "auto" and has_mps):
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16), where bf16 autocast pays."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
    if get_capabilities is not None:
        capabilities = get_capabilities()
        return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))
    try:
        with open(CPUINFO, encoding="utf-8") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(name: str, device: torch.device, d_model: int | None = None) -> str:
    """runtime.precision -> fp32 | bf16 | fp16; auto: bf16 on CUDA that has it, fp16 on older CUDA; on a CPU,
    bf16 when it has native bf16 and d_model >= CPU_BF16_MIN_D_MODEL (where it measured faster), else fp32.

    fp16 on CUDA needs a torch.amp.GradScaler in the training loop."""
    if name not in PRECISIONS:
        raise ConfigError(f"runtime.precision = {name!r}: must be one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if name == "auto":
        if device.type == "cpu":
            large = d_model is not None and d_model >= CPU_BF16_MIN_D_MODEL
            return "bf16" if large and cpu_has_native_bf16() else "fp32"
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("runtime.precision = 'fp16': not supported on CPU; use bf16 or fp32 (or auto)")
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"runtime.precision = 'bf16': {torch.cuda.get_device_name(device)} has no bf16; "
                          "use fp16 or auto")
    return name


def resolve_threads(setting: int, num_params: int, matmul_work: int) -> int:
    """runtime.threads -> CPU threads: the number given, or for 0 (auto) torch's default (the physical
    cores) for models of SMALL_MODEL_PARAMS parameters or matmuls of PARALLEL_MIN_WORK multiply-adds, and
    1 thread below both, where a second thread gains little and stalls on a busy machine."""
    if setting < 0:
        raise ConfigError(f"runtime.threads = {setting}: must be >= 0 (0 = auto)")
    if setting:
        return setting
    parallel = num_params >= SMALL_MODEL_PARAMS or matmul_work >= PARALLEL_MIN_WORK
    return DEFAULT_THREADS if parallel else 1


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next step instead of returning it to the OS (see
    KEEP_FREED_MEMORY); True when it took effect, False on a C library without glibc's mallopt."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    return all([mallopt(parameter, value) == 1 for parameter, value in KEEP_FREED_MEMORY])


def set_threads(setting: int, model: torch.nn.Module, device: torch.device, rows: int) -> int:
    """Apply runtime.threads for running `model` (a GPT) on `device` with `rows` tokens per forward pass
    (batch x context in training, 1 when decoding), and keep freed memory; CPU only, a GPU run keeps
    torch's threads and allocator."""
    if device.type == "cpu":
        keep_freed_memory()
        work = rows * model.config.d_model ** 2
        torch.set_num_threads(resolve_threads(setting, sum(p.numel() for p in model.parameters()), work))
    return torch.get_num_threads()


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16/fp16 (matmuls in half precision, reductions in fp32); a no-op for fp32."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def peak_flops_for_name(device_name: str, precision: str, tf32: bool = False) -> float | None:
    """Dense peak FLOP/s of the GPU called `device_name` at `precision` (tf32: fp32 matmuls use TF32)."""
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            if precision in AUTOCAST_DTYPES:
                return peaks.get(precision, peaks["half"])
            return peaks.get("tf32") if tf32 and peaks.get("tf32") else peaks["fp32"]
    return None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of `device` at `precision`; None on CPU/MPS or a GPU missing from PEAK_FLOPS."""
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), precision,
                               tf32=torch.backends.cuda.matmul.allow_tf32)


def mfu(tokens_per_sec: float, flops_per_token: float, device: torch.device, precision: str) -> float | None:
    """Model FLOPs utilisation of one device: achieved / peak FLOP/s (PaLM, Chowdhery et al. 2022); None if
    the peak is unknown. Pass the tokens/s of this device (per rank under DDP)."""
    peak = peak_flops(device, precision)
    return None if peak is None else tokens_per_sec * flops_per_token / peak

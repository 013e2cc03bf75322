"""Device and precision choice, autocast, and model FLOPs utilisation (MFU) from a table of peak FLOPs."""

from __future__ import annotations

import contextlib
import os
import re

import torch

from llm.config import DEVICES, PRECISIONS
from llm.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

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


def resolve_precision(name: str, device: torch.device) -> str:
    """runtime.precision -> fp32 | bf16 | fp16; auto: bf16 on CUDA that has it, fp16 on older CUDA, else fp32.

    fp16 on CUDA needs a torch.amp.GradScaler in the training loop."""
    if name not in PRECISIONS:
        raise ConfigError(f"runtime.precision = {name!r}: must be one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if name == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("runtime.precision = 'fp16': not supported on CPU; use bf16 or fp32 (or auto)")
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"runtime.precision = 'bf16': {torch.cuda.get_device_name(device)} has no bf16; "
                          "use fp16 or auto")
    return name


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

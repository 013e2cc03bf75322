"""Device and precision resolution, autocast, the peak-FLOPs table and MFU."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

from llm import hardware
from llm.config import ModelConfig
from llm.errors import ConfigError
from llm.hardware import (
    autocast,
    mfu,
    peak_flops,
    peak_flops_for_name,
    resolve_device,
    resolve_precision,
    resolve_threads,
    set_threads,
)
from llm.model import GPT

CPU = torch.device("cpu")


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")


def test_resolve_device_auto_without_gpu_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    with pytest.raises(ConfigError, match="runtime.device = 'cuda'"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="runtime.device = 'mps'"):
        resolve_device("mps")
    with pytest.raises(ConfigError, match="must be one of"):
        resolve_device("tpu")


def test_resolve_device_under_torchrun_uses_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cuda") == torch.device("cuda", 3)


def test_resolve_precision_on_cpu():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="must be one of"):
        resolve_precision("int8", CPU)


@pytest.mark.parametrize("native_bf16,d_model,expected", [
    (True, 512, "bf16"), (True, 128, "bf16"), (True, 64, "fp32"), (False, 512, "fp32"), (True, None, "fp32")])
def test_auto_precision_on_cpu_is_bf16_for_large_models_on_bf16_hardware(monkeypatch, native_bf16, d_model,
                                                                          expected):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_precision("auto", CPU, d_model) == expected
    assert resolve_precision("fp32", CPU, d_model) == "fp32"  # an explicit choice always wins


@pytest.fixture
def fresh_bf16_detection():
    """cpu_has_native_bf16 caches its answer: forget it before and after a test that fakes the CPU."""
    hardware.cpu_has_native_bf16.cache_clear()
    yield hardware.cpu_has_native_bf16
    hardware.cpu_has_native_bf16.cache_clear()


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch, tmp_path, fresh_bf16_detection):
    def detect() -> bool:
        fresh_bf16_detection.cache_clear()
        return fresh_bf16_detection()

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False, "avx512_bf16": True},
                        raising=False)
    assert detect()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True}, raising=False)
    assert not detect()
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)  # older torch: Linux's flags
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(hardware, "CPUINFO", str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    assert detect()
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2\n")
    assert not detect()
    monkeypatch.setattr(hardware, "CPUINFO", str(tmp_path / "missing"))
    assert not detect()


def test_threads_auto_is_one_for_small_work_and_all_cores_for_large_models_or_matmuls(monkeypatch):
    kept = []
    monkeypatch.setattr(hardware, "keep_freed_memory", lambda: kept.append(True))
    assert resolve_threads(0, 500_000, 1024 * 32 ** 2) == 1  # a test-sized model and batch
    assert resolve_threads(0, 500_000, 1 * 128 ** 2) == 1  # decoding a small model
    assert resolve_threads(0, 500_000, 2048 * 128 ** 2) == hardware.DEFAULT_THREADS  # README's CPU recipe
    assert resolve_threads(0, 50_000_000, 1 * 512 ** 2) == hardware.DEFAULT_THREADS  # decoding a large one
    assert resolve_threads(3, 500_000, 1) == 3  # an explicit count always wins
    with pytest.raises(ConfigError, match="runtime.threads = -1"):
        resolve_threads(-1, 1, 1)
    before = torch.get_num_threads()
    try:
        small = GPT(ModelConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=1, d_ff=64,
                                max_seq_length=16))
        assert set_threads(0, small, CPU, rows=4 * 16) == 1 == torch.get_num_threads()
        enough = -(-hardware.PARALLEL_MIN_WORK // 32 ** 2)  # rows whose matmuls reach the threshold
        assert set_threads(0, small, CPU, rows=enough) == hardware.DEFAULT_THREADS
        torch.set_num_threads(2)
        assert set_threads(0, small, torch.device("cuda"), rows=1) == 2  # a GPU run keeps torch's threads
        assert len(kept) == 2  # each CPU run keeps freed memory; the GPU run leaves malloc alone
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bf16_ok,expected", [(True, "bf16"), (False, "fp16")])
def test_resolve_precision_auto_on_cuda(monkeypatch, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert resolve_precision("auto", torch.device("cuda")) == expected


def test_autocast_bf16_on_cpu_and_fp32_noop():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("bf16", CPU):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("fp32", CPU):
        assert (a @ b).dtype == torch.float32
    assert isinstance(autocast("fp32", CPU), contextlib.nullcontext)


@pytest.mark.parametrize("name,precision,expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-PCIE-40GB", "fp16", 312e12),
    ("NVIDIA A100-SXM4-40GB", "fp32", 19.5e12),
    ("NVIDIA A10", "bf16", 125e12),  # not mistaken for an A100
    ("NVIDIA A10G", "bf16", 70e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA L40S", "bf16", 362e12),
    ("Tesla V100-SXM2-16GB", "fp16", 125e12),
    ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 on Volta
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2e12),
    ("NVIDIA GeForce RTX 3090", "fp32", 35.6e12),
    ("Some Future GPU", "bf16", None),
])
def test_peak_flops_table_lookup_by_name(name, precision, expected):
    assert peak_flops_for_name(name, precision) == expected


def test_peak_flops_tf32_for_fp32_matmuls():
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156e12
    assert peak_flops_for_name("Tesla V100-SXM2-16GB", "fp32", tf32=True) == 15.7e12  # no TF32: plain fp32


def test_peak_flops_and_mfu_on_cpu_are_none():
    assert peak_flops(CPU, "fp32") is None
    assert mfu(1000.0, 1e9, CPU, "fp32") is None


def test_mfu_math(monkeypatch):
    monkeypatch.setattr(hardware, "peak_flops", lambda device, precision: 100e12)
    # 50k tokens/s * 6e8 FLOPs/token = 3e13 FLOP/s = 30% of 1e14
    assert mfu(50_000.0, 6e8, torch.device("cuda"), "bf16") == pytest.approx(0.30)


PAGE_FAULTS_OF_FIVE_STEPS = """
import resource, sys, torch
from llm.config import ModelConfig
from llm.hardware import keep_freed_memory
from llm.model import GPT
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
torch.set_num_threads(1)
config = ModelConfig(vocab_size=1024, d_model=128, num_heads=4, num_layers=2, d_ff=512, max_seq_length=128)
model = GPT(config)
tokens = torch.randint(0, 1024, (16, 129))
for step in range(7):
    if step == 2:  # after two warm-up steps
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(tokens[:, :-1], tokens[:, 1:]).backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keeping_freed_memory_stops_a_training_step_faulting_its_pages_back_in():
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_FIVE_STEPS, mode], capture_output=True,
                              text=True, check=True)
        return int(done.stdout)

    kept, default = faults("keep"), faults("default")
    assert kept * 3 < default, (kept, default)  # measured: ~2,000 against 11,000-19,000

"""Device and precision choice, shared by every network."""
from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # int8: CPU, SuperPoint only, opt-in


def idle_cores(cpu_count: int | None = None, load: float | None = None) -> int:
    """CPU cores not already busy (by the 1-minute load average), at least 1.

    Torch's intra-op threads spin-wait: on a 2-core machine with one core taken by another job,
    2 threads ran the VO at 2.7 FPS and 1 thread at 15 FPS (18-21 FPS either way when idle).
    """
    cpu_count = cpu_count or os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cpu_count, int(cpu_count - load + 0.5)))


def select_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        caps = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        return False
    if "AVX512" not in caps.upper():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        return False


def select_precision(device: torch.device, precision: str | None = None) -> str:
    """The requested precision, or the fastest faithful one for ``device``."""
    if precision is not None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "int8" and device.type != "cpu":
            raise ValueError("precision 'int8' runs on the CPU only; use 'fp16' on CUDA")
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' on the CPU")
        if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
            return "fp32"  # no bf16 units: emulated bf16 would be slower than fp32
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` (a no-op for fp32)."""
    if precision in ("fp32", "int8"):   # int8 networks take and return float tensors
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)

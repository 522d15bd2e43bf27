"""Which floating-point type computes fastest on a device: one rule for training and inference.

bf16 is chosen where the hardware has bf16 matrix units (CUDA GPUs that support it; x86 CPUs with
AVX512-BF16 or AMX, where oneDNN runs bf16 matmuls and convolutions ~2x faster than fp32), fp32 elsewhere.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo; False where it is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 where the device computes it natively and fast, else float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32

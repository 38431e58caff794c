"""Which device a command runs on: `--device auto|cpu|cuda|cuda:N`."""
from __future__ import annotations

import torch

from ..errors import LlamaforgeError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """auto: the first CUDA device when there is one, else the CPU. A CUDA device that is not
    there is one clear error, before anything is loaded."""
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise LlamaforgeError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise LlamaforgeError(f"--device {spec!r}: llamaforge runs on cpu or cuda")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise LlamaforgeError(f"--device {spec}: no CUDA device here (torch {torch.__version__} is {build}); "
                              f"use --device cpu or auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise LlamaforgeError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
    return device


def cpu_flags_have(*names: str) -> bool:
    """Whether this machine's CPU lists every one of these flags (Linux's /proc/cpuinfo names:
    avx512_bf16, amx_bf16, ...); False where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {name}" in flags for name in names)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch built on the CPU, on `device`: to a GPU from pinned memory, without waiting for
    the copy (the GPU orders it before the kernels that read it)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

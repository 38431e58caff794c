"""The machine a benchmark ran on, printed beside every figure: this project's speed-ups depend on
the CPU's matrix units (AMD AVX-512 BF16, Intel AMX), and machines drift, so a figure without its
CPU means little."""
from __future__ import annotations

import platform
import subprocess


def cpu_name() -> str:
    """e.g. "AMD EPYC 9R14 (AVX-512 BF16, AVX-512, AVX2), 2 threads" (lscpu's model name and the
    ISA extensions that decide the kernels: AMX-BF16, AVX-512 BF16, AVX-512, AVX2)."""
    import torch
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        flags = next(line for line in out.splitlines() if line.startswith("Flags"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
    isa = [name for name, flag in (("AMX-BF16", " amx_bf16"), ("AVX-512 BF16", " avx512_bf16"),
                                   ("AVX-512", " avx512f"), ("AVX2", " avx2")) if flag in flags]
    return f"{model} ({', '.join(isa) or 'no AVX2'}){emulated()}, {torch.get_num_threads()} threads"


def emulated() -> str:
    """What of the CPU a run was told not to use, so that a figure from a CPU kind emulated on
    another (AVX-512 without AMX: `LLAMAFORGE_NO_AMX=1 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`) says
    so: e.g. " [emulating: no AMX kernels, oneDNN up to AVX512_CORE_BF16]"."""
    import os
    off = [text for var, text in (("LLAMAFORGE_NO_AMX", "no AMX kernels"),
                                  ("LLAMAFORGE_NO_KERNELS", "no llamaforge kernels")) if os.environ.get(var)]
    off += [f"{name} up to {os.environ[var]}" for var, name in (("ONEDNN_MAX_CPU_ISA", "oneDNN"),
                                                                 ("ATEN_CPU_CAPABILITY", "ATen"))
            if os.environ.get(var)]
    return f" [emulating: {', '.join(off)}]" if off else ""


def print_machine(file=None):
    """One line naming the CPU, at the top of a benchmark's output."""
    print(f"CPU: {cpu_name()}", file=file, flush=True)

"""Batch-1 decoding reads every weight once per token: how fast can a bf16 matrix-vector product
read memory here? PyTorch's `F.linear` against llamaforge's AVX-512 kernel (model/kernels.py), same run.

    .venv/bin/python benchmarks/bench_gemv.py

Prints GB/s of weights read for SmolLM2-135M's shapes (the 49152x576 output projection does not
fit in cache, so it shows DRAM speed), the ratio, and a plain `sum` over the same bytes as the
bandwidth reference. The kernel is compiled on first use (~30 s, then cached).
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402


def gb_per_s(fn, nbytes, runs=30):
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


def main():
    print_machine()
    from llamaforge.model.kernels import gemv_extension
    t = time.perf_counter()
    ext = gemv_extension()
    if ext is None:
        raise SystemExit("the kernel cannot be built here (needs g++, ninja and an AVX-512 CPU)")
    print(f"kernel ready in {time.perf_counter() - t:.1f} s; {torch.get_num_threads()} threads")
    print(f"{'shape (N x K)':18}{'F.linear GB/s':>15}{'ours GB/s':>12}{'ratio':>8}{'sum GB/s':>10}{'max rel err':>13}")
    for n, k in [(49152, 576), (3072, 576), (960, 576), (576, 1536)]:
        w, x = torch.randn(n, k).bfloat16(), torch.randn(k).bfloat16()
        ref = F.linear(x[None].float(), w.float())[0]
        err = ((ext.gemv_bf16(w, x) - ref).abs().max() / ref.abs().max()).item()
        nbytes = w.numel() * 2
        # Default arguments bind this iteration's tensors (each lambda is timed before the next).
        theirs = gb_per_s(lambda w=w, x=x: F.linear(x[None], w), nbytes)
        ours = gb_per_s(lambda w=w, x=x: ext.gemv_bf16(w, x), nbytes)
        plain = gb_per_s(lambda w=w: w.sum(), nbytes)
        print(f"{f'{n} x {k}':18}{theirs:>15.1f}{ours:>12.1f}{ours / theirs:>7.2f}x{plain:>10.1f}{err:>13.1e}")


if __name__ == "__main__":
    main()

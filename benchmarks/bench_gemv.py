"""Batch-1 decoding reads every weight once per token: how fast can a bf16 matrix-vector product
read memory here? PyTorch's `F.linear` against llamaforge's AVX-512 kernel (model/kernels.py), same run.

    .venv/bin/python benchmarks/bench_gemv.py [--int4]

Prints GB/s of weights read for SmolLM2-135M's shapes (the 49152x576 output projection does not
fit in cache, so it shows DRAM speed), the ratio, and a plain `sum` over the same bytes as the
bandwidth reference. The kernel is compiled on first use (~30 s, then cached).

--int4: the int4 linear layers of SmolLM2-135M (30 blocks x 4 stacked projections, each its own
weights, so they come from memory as in the model) at 1 to 512 rows of activations, ms for all
120: PyTorch's int4 kernel, oneDNN's product with a dense bf16 copy of the same values (what a
server keeps where the CPU has no AMX tiles), and `Int4Linear` itself: from DENSE_MIN_ROWS rows it
unpacks each layer's weights (`int4pack_to_bf16_t`) for the dense matmul; on AMX tiles it takes
`int4_mm_amx` below AMX_MAX_ROWS rows and `int4_dense_mm_amx` from there.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402


def median_seconds(fn, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gb_per_s(fn, nbytes, runs=30):
    return nbytes / median_seconds(fn, runs) / 1e9


def int4_layers(runs: int = 7):
    from llamaforge.model.kernels import int4pack_to_bf16_t
    from llamaforge.model.quantize import Int4Linear
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30   # qkv, o, gate_up, down
    layers = [Int4Linear(torch.randn(n, k) * 0.02, None, torch.bfloat16) for n, k in shapes]
    dense_copies = [int4pack_to_bf16_t(lin.weight, lin.scales_and_zeros, 32) for lin in layers]   # (K, N)

    def stack_ms(fn):
        return median_seconds(fn, runs, warmup=1) * 1e3

    print(f"\nint4, SmolLM2's 120 linear layers, ms for all (medians of {runs}); Int4Linear multiplies densely "
          f"from {layers[0].dense_min_rows} rows")
    print(f"{'rows':>5}{'PyTorch int4':>14}{'dense copy':>12}{'Int4Linear':>12}{'vs PyTorch':>12}{'vs copy':>10}")
    for m in (1, 16, 32, 64, 128, 256, 512):
        xs = {k: torch.randn(m, k).bfloat16() for k in (576, 1536)}
        pt = stack_ms(lambda xs=xs: [torch.ops.aten._weight_int4pack_mm_for_cpu(
            xs[lin.in_features], lin.weight, 32, lin.scales_and_zeros) for lin in layers])
        dense = stack_ms(lambda xs=xs: [xs[lin.in_features] @ copy for lin, copy in zip(layers, dense_copies, strict=True)])
        ours = stack_ms(lambda xs=xs: [lin(xs[lin.in_features]) for lin in layers])
        print(f"{m:>5}{pt:>14.2f}{dense:>12.2f}{ours:>12.2f}{pt / ours:>11.2f}x{dense / ours:>9.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--int4", action="store_true", help="also the int4 layers at 1-512 rows")
    args = ap.parse_args()
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
    if args.int4:
        int4_layers()


if __name__ == "__main__":
    main()

"""One hand-written CPU kernel: a bf16 matrix-vector product for batch-1 decoding.

Decoding one token reads every weight once, so its speed is the speed at which the matmul reads
memory. PyTorch's bf16 `F.linear` at one row reads DRAM-resident weights at ~17 GB/s on a 2-core
AVX-512 CPU, where a plain sum reads ~48 GB/s; the loop below reads at ~38 GB/s
(`benchmarks/bench_gemv.py`). It is compiled on first use with torch.utils.cpp_extension (about
30 s, then cached on disk); without g++, ninja or AVX-512 llamaforge falls back to `F.linear`.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LlamaforgeError

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// y = W x for bf16 W (N, K) and one bf16 row x (K,), accumulated in fp32; rows of W split
// across threads. bf16 -> fp32 is a 16-bit left shift.
torch::Tensor gemv_bf16(torch::Tensor w, torch::Tensor x) {
  const int64_t N = w.size(0), K = w.size(1);
  auto y = torch::empty({N}, torch::dtype(torch::kFloat32));
  auto xs = x.to(torch::kFloat32).contiguous();
  const float* X = xs.data_ptr<float>();
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* row = W + n * K;
      __m512 acc = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
        __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        acc = _mm512_fmadd_ps(wf, _mm512_loadu_ps(X + k), acc);
      }
      float s = _mm512_reduce_add_ps(acc);
      for (; k < K; ++k) {
        uint32_t b = static_cast<uint32_t>(row[k]) << 16;
        float f;
        std::memcpy(&f, &b, 4);
        s += f * X[k];
      }
      Y[n] = s;
    }
  });
  return y;
}
"""

_extension = None
_tried = False


def require_cpp_compiler(option: str):
    """torch.compile builds its CPU kernels with a C++ compiler: without one, refuse `option` in
    one line now rather than with a compiler traceback at the first step."""
    import shutil
    if not any(c and shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++", "c++")):
        raise LlamaforgeError(f"{option} needs a C++ compiler (torch.compile builds its CPU kernels with "
                              f"one): install g++, or leave out {option}")


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512f" in flags and " avx512bw" in flags


def gemv_extension():
    """The compiled kernel module, or None where it cannot be built (then F.linear is used)."""
    global _extension, _tried
    if _tried:
        return _extension
    _tried = True
    if os.environ.get("LLAMAFORGE_NO_KERNELS") or not _cpu_has_avx512():
        return None
    try:
        from torch.utils.cpp_extension import load_inline
        print("llamaforge: loading the CPU decode kernel (built on first use, ~30 s)...", file=sys.stderr)
        # -fopenmp: ATen's parallel_for is inlined here and only splits work across threads with OpenMP.
        _extension = load_inline("llamaforge_gemv_bf16", cpp_sources=[_SOURCE], functions=["gemv_bf16"],
                                 extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-fopenmp"],
                                 extra_ldflags=["-fopenmp"])
    except Exception as e:   # no compiler, no ninja, ...: stay on F.linear
        print(f"llamaforge: CPU decode kernel unavailable ({str(e).splitlines()[0][:120]}); "
              "using PyTorch's matmul", file=sys.stderr)
        _extension = None
    return _extension


@torch.library.custom_op("llamaforge::gemv_bf16", mutates_args=())
def gemv_bf16(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 = w (N, K) bf16 @ x (K,) bf16. An opaque op to torch.compile."""
    return gemv_extension().gemv_bf16(w, x)


@gemv_bf16.register_fake
def _(w, x):
    return w.new_empty((w.shape[0],), dtype=torch.float32)


class GemvLinear(nn.Module):
    """A bf16 linear layer that uses the kernel for single-row inputs (decoding)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features:   # more than one row: PyTorch's matmul is the fast one
            return F.linear(x, self.weight, self.bias)
        y = gemv_bf16(self.weight, x.reshape(-1).contiguous()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def use_gemv_kernel(model: nn.Module) -> bool:
    """Swap a bf16 CPU model's linear layers (and its output projection) for GemvLinear.
    Returns False, changing nothing, where the kernel is unavailable."""
    if model.embed_tokens.weight.dtype != torch.bfloat16 or model.embed_tokens.weight.device.type != "cpu":
        return False
    if gemv_extension() is None:
        return False
    model.replace_linears(GemvLinear)
    if model.lm_head is None:
        model.lm_head = GemvLinear(nn.Linear(model.config.dim, model.config.vocab_size, bias=False, device="meta"))
        model.lm_head.weight = model.embed_tokens.weight   # still tied: no copy
    else:
        model.lm_head = GemvLinear(model.lm_head)
    return True

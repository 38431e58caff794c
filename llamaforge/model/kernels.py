"""Hand-written CPU kernels: matrix-vector products for batch-1 decoding, summed in fp32.

Decoding one token reads every weight once, so its speed is the speed at which the matmul reads
memory. PyTorch's bf16 `F.linear` at one row reads DRAM-resident weights at ~17 GB/s on a 2-core
AVX-512 CPU, where a plain sum reads ~48 GB/s; `gemv_bf16` below reads at ~38 GB/s
(`benchmarks/bench_gemv.py`). `gemv_int8` is the int8 output projection's: PyTorch's int8 kernel
is fast with bf16 activations only, and the logits are computed in fp32 (`Llama.logits`).

They are compiled on first use with torch.utils.cpp_extension (about 30 s), once per machine, torch
and Python: each build has a directory of its own under ~/.cache/llamaforge/kernels, so two
environments never rebuild over each other. Without g++, ninja or AVX-512, llamaforge uses
PyTorch's kernels.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LlamaforgeError
from ..files import cache_dir

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

// y = (W x) * scales for int8 W (N, K), fp32 scales (N,) and one row x (K,), all summed in fp32.
torch::Tensor gemv_int8(torch::Tensor w, torch::Tensor scales, torch::Tensor x) {
  const int64_t N = w.size(0), K = w.size(1);
  auto y = torch::empty({N}, torch::dtype(torch::kFloat32));
  auto xs = x.to(torch::kFloat32).contiguous();
  auto ss = scales.to(torch::kFloat32).contiguous();
  const float* X = xs.data_ptr<float>();
  const float* S = ss.data_ptr<float>();
  const int8_t* W = w.data_ptr<int8_t>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = W + n * K;
      __m512 acc = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
        __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
        acc = _mm512_fmadd_ps(wf, _mm512_loadu_ps(X + k), acc);
      }
      float s = _mm512_reduce_add_ps(acc);
      for (; k < K; ++k) s += static_cast<float>(row[k]) * X[k];
      Y[n] = s * S[n];
    }
  });
  return y;
}
"""
_FUNCTIONS = ["gemv_bf16", "gemv_int8"]
# -fopenmp: ATen's parallel_for is inlined here and only splits work across threads with OpenMP.
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-fopenmp"]

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
        build = _build_directory()
        built = any(build.glob("*.so"))
        print(f"llamaforge: {'loading' if built else 'building (once, ~30 s)'} the CPU decode kernels...", file=sys.stderr)
        build.mkdir(parents=True, exist_ok=True)
        _extension = load_inline("llamaforge_kernels", cpp_sources=[_SOURCE], functions=_FUNCTIONS,
                                 extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], build_directory=str(build))
    except Exception as e:   # no compiler, no ninja, ...: stay on F.linear
        print(f"llamaforge: CPU decode kernel unavailable ({str(e).splitlines()[0][:120]}); "
              "using PyTorch's matmul", file=sys.stderr)
        _extension = None
    return _extension


def _build_directory() -> Path:
    """Where this build lives: keyed by everything that makes it differ (source, flags, torch and
    its headers, Python), so a build is made once and every process that matches reuses it."""
    import hashlib
    import platform

    from torch.utils.cpp_extension import include_paths
    key = hashlib.sha256("\n".join([_SOURCE, *_CFLAGS, torch.__version__, *include_paths(), sys.version,
                                     platform.machine()]).encode()).hexdigest()[:16]
    return cache_dir("kernels") / key


@torch.library.custom_op("llamaforge::gemv_bf16", mutates_args=())
def gemv_bf16(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 = w (N, K) bf16 @ x (K,) bf16. An opaque op to torch.compile."""
    return gemv_extension().gemv_bf16(w, x)


@gemv_bf16.register_fake
def _(w, x):
    return w.new_empty((w.shape[0],), dtype=torch.float32)


@torch.library.custom_op("llamaforge::gemv_int8", mutates_args=())
def gemv_int8(w: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 = (w (N, K) int8 @ x (K,)) * scales (N,). An opaque op to torch.compile."""
    return gemv_extension().gemv_int8(w, scales, x)


@gemv_int8.register_fake
def _(w, scales, x):
    return w.new_empty((w.shape[0],), dtype=torch.float32)


class GemvLinear(nn.Module):
    """A bf16 linear layer that uses the kernel for single-row inputs (decoding)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In x's dtype: bf16, or fp32 (logits: the kernel sums in fp32 anyway)."""
        rows = x.numel() // self.in_features
        if rows > 1 and (x.dtype == torch.bfloat16 or rows > 16):
            # PyTorch's matmul is the fast one for several rows of bf16; fp32 rows (logits of a
            # batch) would need the weight cast, so up to 16 of them take the kernel row by row.
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if rows > 1:
            return torch.stack([self(row) for row in x.reshape(rows, -1)]).view(*x.shape[:-1], self.out_features)
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

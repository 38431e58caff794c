"""Batch-1 decoding reads every weight once per token: how fast can a bf16 matrix-vector product
read memory here? PyTorch's `F.linear` against a minimal AVX-512 kernel of ours, same run.

    .venv/bin/pip install ninja && .venv/bin/python benchmarks/bench_gemv.py

Prints GB/s of weights read for SmolLM2-135M's shapes (the 49152x576 output projection does not
fit in cache, so it shows DRAM speed), the ratio, and a plain `sum` over the same bytes as the
bandwidth reference. The kernel is compiled on first use (~30 s) with torch.utils.cpp_extension;
it needs g++ and an AVX-512 CPU, and is not used by llamaforge itself (yet): this measures what a
dense-dtype decode could gain.
"""
import statistics
import time

import torch
import torch.nn.functional as F

KERNEL = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// y = W x for bf16 W (N, K) and bf16 x (K,), accumulated in fp32; rows split across threads.
torch::Tensor gemv_bf16(torch::Tensor w, torch::Tensor x) {
  const int64_t N = w.size(0), K = w.size(1);
  auto y = torch::empty({N}, torch::dtype(torch::kFloat32));
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  std::vector<float> xf(K);
  auto xs = x.to(torch::kFloat32);
  std::memcpy(xf.data(), xs.data_ptr<float>(), K * sizeof(float));
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint16_t* row = W + n * K;
      __m512 acc = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {  // bf16 -> fp32 is a 16-bit shift
        __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
        __m512 wf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        acc = _mm512_fmadd_ps(wf, _mm512_loadu_ps(xf.data() + k), acc);
      }
      float s = _mm512_reduce_add_ps(acc);
      for (; k < K; ++k) {
        uint32_t b = static_cast<uint32_t>(row[k]) << 16;
        float f;
        std::memcpy(&f, &b, 4);
        s += f * xf[k];
      }
      Y[n] = s;
    }
  });
  return y;
}
"""


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
    from torch.utils.cpp_extension import load_inline
    t = time.perf_counter()
    # -fopenmp: ATen's parallel_for is inlined here and only splits work across threads with OpenMP.
    ext = load_inline("llamaforge_gemv_probe", cpp_sources=[KERNEL], functions=["gemv_bf16"],
                      extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-fopenmp"], extra_ldflags=["-fopenmp"])
    print(f"kernel compiled in {time.perf_counter() - t:.1f} s; {torch.get_num_threads()} threads")
    print(f"{'shape (N x K)':18}{'F.linear GB/s':>15}{'ours GB/s':>12}{'ratio':>8}{'sum GB/s':>10}{'max rel err':>13}")
    for n, k in [(49152, 576), (3072, 576), (960, 576), (576, 1536)]:
        w, x = torch.randn(n, k).bfloat16(), torch.randn(k).bfloat16()
        ref = F.linear(x[None].float(), w.float())[0]
        err = ((ext.gemv_bf16(w, x) - ref).abs().max() / ref.abs().max()).item()
        nbytes = w.numel() * 2
        theirs = gb_per_s(lambda: F.linear(x[None], w), nbytes)
        ours = gb_per_s(lambda: ext.gemv_bf16(w, x), nbytes)
        print(f"{f'{n} x {k}':18}{theirs:>15.1f}{ours:>12.1f}{ours / theirs:>7.2f}x"
              f"{gb_per_s(lambda: w.sum(), nbytes):>10.1f}{err:>13.1e}")


if __name__ == "__main__":
    main()

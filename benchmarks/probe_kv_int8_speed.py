"""What an int8 key/value cache would gain in speed: a server's 16-row decode attention on AMX tiles
reading int8 keys and values (one fp32 scale per position and head) against the bf16 kernel that
llamaforge runs (`decode_attention_amx`), on SmolLM2's shapes, the caches from memory.

    .venv/bin/python benchmarks/probe_kv_int8_speed.py [--rows 16] [--runs 7]

A measurement for issue 14's serving target, beside probe_kv_int8.py (its quality: perplexity
+0.28%). The int8 kernel here is a prototype built by this script, not part of llamaforge: the
bf16 kernel with each 16-key tile of keys converted to bf16 before its tile product (scores times
the keys' scales), and the values converted while they are interleaved for the tiles (their scales
folded into the probabilities). Prints both times a step (30 layers) and the output difference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402

_PROTOTYPE = r"""
#if (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11) || (defined(__clang__) && __clang_major__ >= 12)
// 32 int8 values to 32 bf16 (exact: int8 fits bf16's 8-bit significand).
AMX_FN static inline __m512i int8x32_to_bf16(const int8_t* p) {
  const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(w)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(w, 1)));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

struct Q8Problem {
  int64_t H, G, D, S;
  const uint16_t* Q; const int8_t* K; const int8_t* V; const float* KS; const float* VS; const int64_t* L;
  float sc; uint16_t* O;
};

AMX_FN static void q8_rows(const Q8Problem& a, int64_t begin, int64_t end) {
  const int64_t H = a.H, G = a.G, D = a.D, S = a.S;
  const uint16_t* Q = a.Q; const int8_t* K = a.K; const int8_t* V = a.V;
  const float* KS = a.KS; const float* VS = a.VS; const int64_t* L = a.L; uint16_t* O = a.O;
  const float sc = a.sc;
  {
    const int g = static_cast<int>(G);   // the tiles of llamaforge's first AMX attention kernel, which interleaved values
    configure({{0, 16, 64}, {1, 16, 4 * g}, {2, 16, 4 * g}, {3, g, 64}, {4, g, 64}, {5, g, 64}, {6, g, 64}, {7, g, 64}});
    alignas(64) uint32_t qt[2][16][16];
    alignas(64) float tmp[16][16];
    alignas(64) uint16_t kb16[16][64];
    alignas(64) uint16_t vp[4][16][32];
    alignas(64) float o[16][64];
    __m512i IL, IH;
    pair_indices(IL, IH);
    std::vector<float> scores;
    std::vector<uint16_t> probs;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, n = L[b], n32 = (n + 31) / 32 * 32;
      const int8_t* kp = K + bh * S * D;
      const int8_t* vq = V + bh * S * D;
      const float* ksp = KS + bh * S;
      const float* vsp = VS + bh * S;
      const uint16_t* qp = Q + bh * G * D;
      for (int64_t c = 0; c < 2; ++c)
        for (int r = 0; r < 16; ++r)
          for (int64_t g = 0; g < G; ++g)
            qt[c][r][g] = static_cast<uint32_t>(qp[g * D + 32 * c + 2 * r]) | (static_cast<uint32_t>(qp[g * D + 32 * c + 2 * r + 1]) << 16);
      scores.resize(G * n);
      const int64_t full = n / 16 * 16;
      for (int64_t j = 0; j < full; j += 16) {
        for (int i = 0; i < 16; i += 4)   // the keys 128 ahead
          _mm_prefetch(reinterpret_cast<const char*>(kp + (j + 128 + i) * D), _MM_HINT_T0);
        for (int i = 0; i < 16; ++i) {
          _mm512_store_si512(&kb16[i][0], int8x32_to_bf16(kp + (j + i) * D));
          _mm512_store_si512(&kb16[i][32], int8x32_to_bf16(kp + (j + i) * D + 32));
        }
        _tile_zero(2);
        for (int64_t c = 0; c < 2; ++c) {
          _tile_loadd(0, &kb16[0][32 * c], 128);
          _tile_loadd(1, qt[c], 64);
          _tile_dpbf16ps(2, 0, 1);
        }
        _tile_stored(2, tmp, 64);
        for (int64_t g = 0; g < G; ++g)
          for (int i = 0; i < 16; ++i) scores[g * n + j + i] = tmp[i][g] * ksp[j + i];
      }
      for (int64_t j = full; j < n; ++j)
        for (int64_t g = 0; g < G; ++g) {
          float acc = 0.0f;
          for (int64_t d = 0; d < D; ++d) {
            uint32_t u = static_cast<uint32_t>(qp[g * D + d]) << 16; float f; std::memcpy(&f, &u, 4);
            acc += f * static_cast<float>(kp[j * D + d]);
          }
          scores[g * n + j] = acc * ksp[j];
        }
      probs.assign(G * n32, 0);
      const __m512 scv = _mm512_set1_ps(sc);
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * n;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; j += 16) {
          const __mmask16 live = tail_mask(n - j);
          mx = _mm512_mask_max_ps(mx, live, mx, _mm512_mul_ps(_mm512_maskz_loadu_ps(live, s + j), scv));
        }
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
          const __mmask16 live = tail_mask(n - j);
          const __m512 e = exp512(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(live, s + j), scv), m));
          _mm512_mask_storeu_ps(s + j, live, e);
          sum = _mm512_mask_add_ps(sum, live, sum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int64_t j = 0; j < n; j += 16) {
          const __mmask16 live = tail_mask(n - j);
          const __m512 p = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(live, s + j), inv), _mm512_maskz_loadu_ps(live, vsp + j));
          _mm256_mask_storeu_epi16(probs.data() + g * n32 + j, live, to_bf16(p));
        }
      }
      _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
      for (int64_t j = 0; j < n32; j += 32) {
        for (int i = 0; i < 32; i += 2)   // the values 128 ahead
          _mm_prefetch(reinterpret_cast<const char*>(vq + (j + 128 + i) * D), _MM_HINT_T0);
        for (int r = 0; r < 16; ++r) {
          const int64_t k0 = j + 2 * r, k1 = k0 + 1;
          for (int64_t c = 0; c < 2; ++c) {
            const __m512i a0 = k0 < n ? int8x32_to_bf16(vq + k0 * D + 32 * c) : _mm512_setzero_si512();
            const __m512i a1 = k1 < n ? int8x32_to_bf16(vq + k1 * D + 32 * c) : _mm512_setzero_si512();
            _mm512_store_si512(vp[2 * c][r], _mm512_permutex2var_epi16(a0, IL, a1));
            _mm512_store_si512(vp[2 * c + 1][r], _mm512_permutex2var_epi16(a0, IH, a1));
          }
        }
        _tile_loadd(3, probs.data() + j, n32 * 2);
        _tile_loadd(0, vp[0], 64); _tile_dpbf16ps(4, 3, 0);
        _tile_loadd(0, vp[1], 64); _tile_dpbf16ps(5, 3, 0);
        _tile_loadd(0, vp[2], 64); _tile_dpbf16ps(6, 3, 0);
        _tile_loadd(0, vp[3], 64); _tile_dpbf16ps(7, 3, 0);
      }
      _tile_stored(4, &o[0][0], 256); _tile_stored(5, &o[0][16], 256);
      _tile_stored(6, &o[0][32], 256); _tile_stored(7, &o[0][48], 256);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; d += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(O + (bh * G + g) * D + d), to_bf16(_mm512_load_ps(&o[g][d])));
    }
  }
}

AMX_FN torch::Tensor decode_attention_amx_q8(torch::Tensor q, torch::Tensor k, torch::Tensor ks, torch::Tensor v,
                                             torch::Tensor vs, torch::Tensor lengths, double scale) {
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK(D == 64 && G <= 16 && k.is_contiguous() && v.is_contiguous() && ks.is_contiguous() && vs.is_contiguous(),
              "prototype: D 64, contiguous int8 caches");
  auto qc = q.contiguous();
  auto len = lengths.to(torch::kInt64).contiguous();
  auto out = torch::empty({B, H, G, D}, torch::dtype(torch::kBFloat16));
  const Q8Problem a{H, G, D, S, reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>()), k.data_ptr<int8_t>(),
                    v.data_ptr<int8_t>(), ks.data_ptr<float>(), vs.data_ptr<float>(), len.data_ptr<int64_t>(),
                    static_cast<float>(scale), reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>())};
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) { q8_rows(a, begin, end); });
  return out;
}
#endif
"""


def int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (..., D) as int8 with one absmax scale per row, as probe_kv_int8.py rounds it."""
    scale = t.float().abs().amax(-1).clamp(min=1e-8) / 127
    return (t.float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8), scale.contiguous()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--sets", type=int, default=4, help="copies of the 30 layers' caches, cycled: from memory")
    args = ap.parse_args()
    from torch.utils.cpp_extension import load_inline

    from llamaforge.model import kernels
    print_machine()
    if not kernels.amx_available():
        sys.exit("no AMX tiles here: the bf16 kernel this compares with does not run")
    ext = load_inline("llamaforge_kv_int8_probe", cpp_sources=[kernels._SOURCE + _PROTOTYPE],
                      functions=["decode_attention_amx_q8", "amx_enable"], extra_cflags=kernels._CFLAGS,
                      extra_ldflags=["-fopenmp"])
    ext.amx_enable()
    base = kernels.gemv_extension()
    layers, B, Hkv, G, D, S = 30, args.rows, 3, 3, 64, 1024
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(64 + 64, 512 + 128, (B,), generator=g)   # 64-512-token prompts, some tokens made
    print(f"{B} rows at {int(lengths.min())}-{int(lengths.max())} positions (mean {lengths.float().mean():.0f}), "
          f"{layers} layers x {args.sets} sets of caches")
    sets = []
    for _ in range(args.sets):
        layer = []
        for _ in range(layers):
            k = torch.randn(B, Hkv, S, D, generator=g).bfloat16()
            v = torch.randn(B, Hkv, S, D, generator=g).bfloat16()
            q = torch.randn(B, Hkv, G, D, generator=g).bfloat16()
            layer.append((q, k, v, *int8_rows(k), *int8_rows(v)))
        sets.append(layer)
    scale = D ** -0.5

    def bf16_step(layer):
        for q, k, v, *_ in layer:
            base.decode_attention_amx(q, k, v, lengths, scale)

    def int8_step(layer):
        for q, _, _, kq, ks, vq, vs in layer:
            ext.decode_attention_amx_q8(q, kq, ks, vq, vs, lengths, scale)
    q, k, v, kq, ks, vq, vs = sets[0][0]
    a = base.decode_attention_amx(q, k, v, lengths, scale).float()
    b = ext.decode_attention_amx_q8(q, kq, ks, vq, vs, lengths, scale).float()
    ref = base.decode_attention_amx(q, (kq.float() * ks[..., None]).bfloat16(), (vq.float() * vs[..., None]).bfloat16(),
                                    lengths, scale).float()
    print(f"int8 kernel against the bf16 kernel on the same int8-rounded keys and values: max |diff| "
          f"{(b - ref).abs().max():.4f}; against unrounded bf16: mean |diff| {(b - a).abs().mean():.4f} "
          f"(output values ~{a.abs().mean():.3f})")
    times = {"bf16": [], "int8": []}
    for _ in range(args.runs):   # alternating, every set once per run
        for name, step in (("bf16", bf16_step), ("int8", int8_step)):
            t = time.perf_counter()
            for layer in sets:
                step(layer)
            times[name].append((time.perf_counter() - t) / len(sets))
    kv_bytes = sum(int(n) for n in lengths) * Hkv * D * 2 * layers
    for name, ts in times.items():
        m = statistics.median(ts)
        read = kv_bytes * (2 if name == "bf16" else 1) + (kv_bytes // D * 4 if name == "int8" else 0)
        print(f"{name}: {m * 1000:.2f} ms a step (median of {args.runs}; {read / 1e6:.0f} MB of keys and values, "
              f"{read / m / 1e9:.1f} GB/s)")
    print(f"int8 / bf16: {statistics.median(times['int8']) / statistics.median(times['bf16']):.2f}x the time")


if __name__ == "__main__":
    main()

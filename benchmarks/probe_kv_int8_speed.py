"""What an int8 key/value cache would gain in a server's decode step, and cost in quality: a
16-row decode attention on AMX tiles over int8 keys and values (one fp32 scale per position and
head) against the bf16 kernel that llamaforge runs (`decode_attention_amx`), on SmolLM2's shapes,
the caches from memory; then SmolLM2 decoding a held-out text token by token with each.

    .venv/bin/python benchmarks/probe_kv_int8_speed.py [--rows 16] [--runs 7] [--tokens 384]

A measurement for issue 14's serving target, beside probe_kv_int8.py (the cache's rounding alone,
in a prefill: perplexity +0.28%). The int8 kernel is a prototype built by this script, not part of
llamaforge. It does its arithmetic in int8 on the tiles, so nothing is widened to bf16 on the way:
scores are the keys straight from the cache times the queries rounded to int8 (one scale a head),
16 keys a TDPBSSD; values straight from the cache times the probabilities (each times its value's
scale) rounded to u8 with one scale per 64 keys, 16 keys a TDPBUSD, in which each query head takes
four rows, (p, 0, 0, 0) ... (0, 0, 0, p), for the four dimensions a column of the tile sums. The
first prototype here widened int8 to bf16 for the bf16 kernel's tile products: 1.37-1.41x the bf16
kernel's time (the widening cost more than the halved bytes saved).
Prints both times a step (30 layers), the outputs' differences, and for decoding: perplexity and
how often the top token is the bf16 kernel's, with the bf16 kernel, with it over int8-rounded
keys and values (the cache's rounding alone), and with the int8 kernel.
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
struct KvInt8Problem {
  int64_t H, G, D, S;
  const uint16_t* Q; const int8_t* K; const int8_t* V; const float* KS; const float* VS; const int64_t* L;
  float sc; uint16_t* O;
};

constexpr int64_t INT8_AHEAD = 128;   // keys (or values) prefetched ahead: 8 KB of SmolLM2's

AMX_FN static void kv_int8_rows_amx(const KvInt8Problem& a, int64_t begin, int64_t end) {
  const int64_t H = a.H, G = a.G, D = a.D, S = a.S, C = D / 64;
  const int g4 = static_cast<int>(4 * G);
  // 0 keys / values (16 x 64 bytes), 4 queries (16 x 4G bytes: 4 dims of G heads), 2 scores (16 keys x G int32),
  // 5 probabilities (4G rows x 16 keys x 4 bytes), 6 outputs (4G rows x 16 int32)
  configure({{0, 16, 64}, {1, 16, 64}, {2, 16, g4}, {3, 16, g4}, {4, 16, g4}, {5, g4, 64}, {6, g4, 64}});
  alignas(64) int8_t qt[4][16][16];        // per 64 dims: 16 rows x (G heads x 4 bytes)
  alignas(64) int32_t tmp[16][16], tmp2[16][16];
  alignas(64) int32_t otile[16][16];
  alignas(64) int8_t last[32][256];        // the last keys / values of a row, zeros past its length
  alignas(64) float acc[4][4][4][16];      // [g][chunk][jj][n]: out[g][64 chunk + 4 n + jj]
  __m512i pick[4];                         // column g of 16 keys x G int32 stored packed: index G k + g (mod 32)
  __mmask16 upper[4];                       // the keys whose index is 32 or more
  for (int64_t g = 0; g < G; ++g) {
    alignas(64) int32_t idx[16];
    upper[g] = 0;
    for (int k = 0; k < 16; ++k) { idx[k] = static_cast<int32_t>((G * k + g) % 32); if (G * k + g >= 32) upper[g] |= 1 << k; }
    pick[g] = _mm512_load_si512(idx);
  }
  std::vector<float> scores, beta;
  std::vector<uint32_t> probs;
  const auto prefetch = [&](const int8_t* p, int64_t count) {
    for (int64_t i = 0; i < count * D; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + i, _MM_HINT_T0);
  };
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / H, n = a.L[b], n16 = (n + 15) / 16 * 16, blocks = n16 / 16;
    const int8_t* kp = a.K + bh * S * D;
    const int8_t* vp = a.V + bh * S * D;
    const int8_t* kn = bh + 1 < end ? a.K + (bh + 1) * S * D : nullptr;
    const float* ksp = a.KS + bh * S;
    const float* vsp = a.VS + bh * S;
    const uint16_t* qp = a.Q + bh * G * D;
    float sq[4];
    for (int64_t g = 0; g < G; ++g) {       // each query head to int8, one scale
      __m512 mx = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(load_bf16(reinterpret_cast<const at::BFloat16*>(qp + g * D + d))));
      const float amax = _mm512_reduce_max_ps(mx);
      sq[g] = amax > 0 ? amax / 127.0f : 1.0f;
      const __m512 inv = _mm512_set1_ps(1.0f / sq[g]);
      for (int64_t d = 0; d < D; d += 16) {
        const __m128i q8 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(load_bf16(reinterpret_cast<const at::BFloat16*>(qp + g * D + d)), inv)));
        alignas(16) int8_t t[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(t), q8);
        for (int i = 0; i < 16; ++i) {       // dim d + i: chunk, row (4 dims), byte
          const int64_t dim = d + i, c = dim / 64, r = (dim % 64) / 4, jb = dim % 4;
          qt[c][r][4 * g + jb] = t[i];
        }
      }
    }
    scores.resize(G * n16);
    float* s = scores.data();
    for (int64_t j = 0; j < n16; j += 32) {   // scores: 32 keys in two chains of tile products
      const int64_t ahead = j + INT8_AHEAD;
      prefetch(ahead < n ? kp + ahead * D : vp + (ahead - n) * D, 32);
      const bool two = j + 16 < n16;
      const int8_t* k0 = kp + j * D;
      const int8_t* k1 = kp + (j + 16) * D;
      if (j + 32 > n) {                  // the last keys: zeros past n
        std::memset(last, 0, 32 * D);
        std::memcpy(last, k0, (n - j) * D);
        k0 = &last[0][0];
        k1 = &last[0][0] + 16 * D;
      }
      _tile_zero(2); _tile_zero(3);
      for (int64_t c = 0; c < C; ++c) {
        _tile_loadd(4, qt[c], 16);
        _tile_loadd(0, k0 + 64 * c, D);
        _tile_dpbssd(2, 0, 4);
        if (two) { _tile_loadd(1, k1 + 64 * c, D); _tile_dpbssd(3, 1, 4); }
      }
      _tile_stored(2, tmp, 4 * G);
      if (two) _tile_stored(3, tmp2, 4 * G);
      for (int half = 0; half < (two ? 2 : 1); ++half) {
        const int32_t* t = half ? &tmp2[0][0] : &tmp[0][0];
        const __m512i r0 = _mm512_load_si512(t), r1 = _mm512_load_si512(t + 16), r2 = _mm512_load_si512(t + 32),
                      r3 = _mm512_load_si512(t + 48);
        const int64_t jh = j + 16 * half;
        const __m512 ks = _mm512_maskz_loadu_ps(tail_mask(n - jh), ksp + jh);
        for (int64_t g = 0; g < G; ++g) {
          const __m512i lo = _mm512_permutex2var_epi32(r0, pick[g], r1);
          const __m512i v = _mm512_mask_blend_epi32(upper[g], lo, _mm512_permutex2var_epi32(r2, pick[g], r3));
          _mm512_storeu_ps(s + g * n16 + jh, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), ks), _mm512_set1_ps(sq[g])));
        }
      }
    }
    probs.resize(4 * G * n16);
    beta.resize(G * blocks);
    const __m512 scv = _mm512_set1_ps(a.sc);
    for (int64_t g = 0; g < G; ++g) {
      float* sg = s + g * n16;
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 live = tail_mask(n - j);
        mx = _mm512_mask_max_ps(mx, live, mx, _mm512_mul_ps(_mm512_maskz_loadu_ps(live, sg + j), scv));
      }
      const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < n16; j += 16) {
        const __mmask16 live = tail_mask(n - j);
        const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(live, sg + j), scv), m)));
        _mm512_storeu_ps(sg + j, e);
        sum = _mm512_add_ps(sum, e);
      }
      const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
      for (int64_t j0 = 0; j0 < n16; j0 += 64) {   // p v_scale to u8, one scale a block of 64
        const int64_t j1 = std::min<int64_t>(j0 + 64, n16);
        __m512 top = _mm512_setzero_ps();
        for (int64_t j = j0; j < j1; j += 16) {
          const __mmask16 live = tail_mask(n - j);
          const __m512 p = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(sg + j), inv), _mm512_maskz_loadu_ps(live, vsp + j));
          _mm512_storeu_ps(sg + j, p);
          top = _mm512_max_ps(top, p);
        }
        const float t = _mm512_reduce_max_ps(top);
        beta[g * blocks + j0 / 64] = t / 255.0f;
        const __m512 up = _mm512_set1_ps(t > 0 ? 255.0f / t : 0.0f);
        for (int64_t j = j0; j < j1; j += 16) {
          const __m512i u = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(sg + j), up));
          for (int jj = 0; jj < 4; ++jj)
            _mm512_storeu_si512(probs.data() + (4 * g + jj) * n16 + j, _mm512_slli_epi32(u, 8 * jj));
        }
      }
    }
    std::memset(acc, 0, sizeof acc);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j0 = 0; j0 < n16; j0 += 64) {   // values, 64 keys' int32 sums in a tile, then scaled
        _tile_zero(6);
        for (int64_t j = j0; j < std::min<int64_t>(j0 + 64, n16); j += 16) {
          const int64_t ahead = j + INT8_AHEAD;
          if (c == C - 1) {
            if (ahead < n) prefetch(vp + ahead * D, 16);
            else if (kn && ahead - n < a.L[(bh + 1) / H]) prefetch(kn + (ahead - n) * D, 16);
          }
          const int8_t* vj = vp + j * D;
          if (j + 16 > n) {
            std::memset(last, 0, sizeof last);
            std::memcpy(last, vj, (n - j) * D);
            vj = &last[0][0];
          }
          _tile_loadd(5, probs.data() + j, n16 * 4);
          _tile_loadd(0, vj + 64 * c, D);
          _tile_dpbusd(6, 5, 0);
        }
        _tile_stored(6, otile, 64);
        for (int64_t g = 0; g < G; ++g) {
          const __m512 bt = _mm512_set1_ps(beta[g * blocks + j0 / 64]);
          for (int jj = 0; jj < 4; ++jj) {
            float* ac = acc[g][c][jj];
            _mm512_store_ps(ac, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(otile[4 * g + jj])), bt, _mm512_load_ps(ac)));
          }
        }
      }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < C; ++c) {
        alignas(64) float o[64];
        for (int jj = 0; jj < 4; ++jj)
          for (int nn = 0; nn < 16; ++nn) o[4 * nn + jj] = acc[g][c][jj][nn];
        for (int d = 0; d < 64; d += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.O + (bh * G + g) * D + 64 * c + d), to_bf16(_mm512_load_ps(o + d)));
      }
  }
}

AMX_FN torch::Tensor decode_attention_amx_int8(torch::Tensor q, torch::Tensor k, torch::Tensor ks, torch::Tensor v,
                                             torch::Tensor vs, torch::Tensor lengths, double scale) {
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), S = k.size(2);
  TORCH_CHECK(D % 64 == 0 && D <= 256 && G <= 4 && k.is_contiguous() && v.is_contiguous() && ks.is_contiguous() && vs.is_contiguous(),
              "prototype: D a multiple of 64, G <= 4, contiguous int8 caches");
  auto qc = q.contiguous();
  auto len = lengths.to(torch::kInt64).contiguous();
  auto out = torch::empty({B, H, G, D}, torch::dtype(torch::kBFloat16));
  const KvInt8Problem a{H, G, D, S, reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>()), k.data_ptr<int8_t>(),
                    v.data_ptr<int8_t>(), ks.data_ptr<float>(), vs.data_ptr<float>(), len.data_ptr<int64_t>(),
                    static_cast<float>(scale), reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>())};
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) { kv_int8_rows_amx(a, begin, end); });
  return out;
}
#endif
"""


def int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (..., D) as int8 with one absmax scale per row, as probe_kv_int8.py rounds it."""
    scale = t.float().abs().amax(-1).clamp(min=1e-8) / 127
    return (t.float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8), scale.contiguous()


def dequantised(q8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q8.float() * scale[..., None]).bfloat16()


def speed(ext, base, args):
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
            ext.decode_attention_amx_int8(q, kq, ks, vq, vs, lengths, scale)
    q, k, v, kq, ks, vq, vs = sets[0][0]
    a = base.decode_attention_amx(q, k, v, lengths, scale).float()
    b = ext.decode_attention_amx_int8(q, kq, ks, vq, vs, lengths, scale).float()
    ref = base.decode_attention_amx(q, dequantised(kq, ks), dequantised(vq, vs), lengths, scale).float()
    print(f"int8 kernel against the bf16 kernel on the same int8-rounded keys and values: mean |diff| "
          f"{(b - ref).abs().mean():.5f} (max {(b - ref).abs().max():.4f}); the rounding alone: mean |diff| "
          f"{(ref - a).abs().mean():.5f}; both: {(b - a).abs().mean():.5f} (output values ~{a.abs().mean():.3f})")
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
        read = kv_bytes * 2 if name == "bf16" else kv_bytes + kv_bytes // D * 4
        print(f"{name}: {m * 1000:.2f} ms a step (median of {args.runs}; {read / 1e6:.0f} MB of keys and values, "
              f"{read / m / 1e9:.1f} GB/s)")
    print(f"int8 / bf16: {statistics.median(times['int8']) / statistics.median(times['bf16']):.2f}x the time")


def quality(ext, tokens: int):
    """SmolLM2 as the CLI loads it decodes a held-out text one token at a time (each step's
    attention over the cache so far), with each attention; perplexity and top-token agreement."""
    from bench_inference import held_out_text

    import llamaforge
    from llamaforge.model import kernels
    from llamaforge.model.generation import decode_one_token
    model, tok = llamaforge.load("default", dtype="bf16", quantize="int4", inference=True)
    ids = tok.encode(held_out_text(), add_special_tokens=False)[:tokens + 1]

    def rounded(q, k, v, lengths=None):
        kq, ks = int8_rows(k)
        vq, vs = int8_rows(v)
        return kernels.decode_attention(q, dequantised(kq, ks), dequantised(vq, vs), lengths)

    def int8(q, k, v, lengths=None):
        B, H, _, D = q.shape
        Hkv = k.shape[1]
        n = torch.full((B,), k.shape[2], dtype=torch.int64)
        return ext.decode_attention_amx_int8(q.reshape(B, Hkv, H // Hkv, D), *int8_rows(k), *int8_rows(v), n,
                                             D ** -0.5).view(B, H, 1, D)

    runs = {}
    for name, attend in (("bf16 kernel", kernels.decode_attention), ("bf16 kernel, int8-rounded cache", rounded),
                         ("int8 kernel", int8)):
        for layer in model.layers:
            layer.self_attn.decode_attention = attend
        model.setup_cache(1, len(ids))
        out = []
        with torch.inference_mode():
            for p, t in enumerate(ids[:-1]):
                out.append(decode_one_token(model, torch.tensor([[t]]), None, p, None)[0])
        runs[name] = torch.stack(out)
    target = torch.tensor(ids[1:])
    base = runs["bf16 kernel"]
    print(f"SmolLM2 (int4 weights, bf16) decoding {len(target)} tokens of held-out text one at a time:")
    for name, logits in runs.items():
        ppl = torch.nn.functional.cross_entropy(logits, target).exp().item()
        same = (logits.argmax(-1) == base.argmax(-1)).float().mean().item()
        print(f"  {name:32} perplexity {ppl:7.3f}  top token as the bf16 kernel's {same * 100:5.1f}%  "
              f"max |logit diff| {(logits - base).abs().max():.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--sets", type=int, default=4, help="copies of the 30 layers' caches, cycled: from memory")
    ap.add_argument("--tokens", type=int, default=384, help="tokens decoded for the quality check (0: none)")
    args = ap.parse_args()
    from torch.utils.cpp_extension import load_inline

    from llamaforge.model import kernels
    print_machine()
    if not kernels.amx_available():
        sys.exit("no AMX tiles here: the bf16 kernel this compares with does not run")
    ext = load_inline("llamaforge_kv_int8_probe", cpp_sources=[kernels._SOURCE + _PROTOTYPE],
                      functions=["decode_attention_amx_int8", "amx_enable"], extra_cflags=kernels._CFLAGS,
                      extra_ldflags=["-fopenmp"])
    ext.amx_enable()
    speed(ext, kernels.gemv_extension(), args)
    if args.tokens:
        quality(ext, args.tokens)


if __name__ == "__main__":
    main()

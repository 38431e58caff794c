"""What an int8 key/value cache would gain in a server's decode step, and cost in quality: a
16-row decode attention on AMX tiles over int8 keys and values (one fp32 scale per position and
head) against the bf16 kernel that llamaforge runs (`decode_attention_amx`), on SmolLM2's shapes,
the caches from memory; then SmolLM2 decoding a held-out text token by token with each.

    .venv/bin/python benchmarks/probe_kv_int8_speed.py [--rows 16] [--runs 7] [--tokens 384]

A measurement for issue 14's serving target, beside probe_kv_int8.py (the cache's rounding alone,
in a prefill: perplexity +0.28%). The int8 kernel (`decode_attention_amx_int8`, what `--kv-cache
int8` runs; a prototype here first) does its arithmetic in int8 on the tiles, nothing widened:
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

from llamaforge.model.kernels import dequantize_kv, quantize_kv  # noqa: E402


def dequantised(q8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return dequantize_kv(q8, scale, torch.bfloat16)


def speed(ext, args):
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
            layer.append((q, k, v, *quantize_kv(k), *quantize_kv(v)))
        sets.append(layer)
    scale = D ** -0.5

    def bf16_step(layer):
        for q, k, v, *_ in layer:
            ext.decode_attention_amx(q, k, v, lengths, scale)

    def int8_step(layer):
        for q, _, _, kq, ks, vq, vs in layer:
            ext.decode_attention_amx_int8(q, kq, ks, vq, vs, lengths, scale)
    q, k, v, kq, ks, vq, vs = sets[0][0]
    a = ext.decode_attention_amx(q, k, v, lengths, scale).float()
    b = ext.decode_attention_amx_int8(q, kq, ks, vq, vs, lengths, scale).float()
    ref = ext.decode_attention_amx(q, dequantised(kq, ks), dequantised(vq, vs), lengths, scale).float()
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


def quality(tokens: int):
    """SmolLM2 as the CLI loads it decodes a held-out text one token at a time (each step's
    attention over the cache so far), with each attention; perplexity and top-token agreement."""
    from bench_inference import held_out_text

    import llamaforge
    from llamaforge.model import kernels
    from llamaforge.model.generation import decode_one_token
    model, tok = llamaforge.load("default", dtype="bf16", quantize="int4", inference=True)
    ids = tok.encode(held_out_text(), add_special_tokens=False)[:tokens + 1]

    def rounded(q, k, v, lengths=None):
        kq, ks = quantize_kv(k)
        vq, vs = quantize_kv(v)
        return kernels.decode_attention(q, dequantised(kq, ks), dequantised(vq, vs), lengths)

    def int8(q, k, v, lengths=None):
        return kernels.decode_attention_int8(q, *quantize_kv(k), *quantize_kv(v))

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
    from llamaforge.model import kernels
    print_machine()
    if not kernels.amx_available():
        sys.exit("no AMX tiles here: neither kernel runs")
    speed(kernels.gemv_extension(), args)
    if args.tokens:
        quality(args.tokens)


if __name__ == "__main__":
    main()

"""What an int8 key/value cache would cost in quality: the CLI default's perplexity (SmolLM2, int4
weights, bf16) with every key and value rounded as an int8 cache would hold it (one absmax scale
per token and head), against bf16 keys and values, on bench_inference.py's held-out text.

    .venv/bin/python benchmarks/probe_kv_int8.py

A measurement for issue 14's serving target (a 16-row decode step spends ~7 of ~22 ms reading bf16
keys and values, which int8 would halve); nothing in llamaforge uses int8 keys and values yet.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import Llamaforge, held_out_text  # noqa: E402
from machine import print_machine  # noqa: E402


def int8_rounded(t: torch.Tensor) -> torch.Tensor:
    """t as an int8 cache gives it back: per (..., token, head) row, scale = absmax / 127."""
    scale = t.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return ((t.float() / scale).round().clamp(-127, 127) * scale).to(t.dtype)


def main():
    import llamaforge.model.llama as llama
    print_machine()
    ours = Llamaforge("bf16", "int4")   # the CLI default, and bench_inference's perplexity
    text = held_out_text()
    base = ours.perplexity(text)
    # Every attention of the forward (SDPA or the blocked causal attention) reads rounded keys and values.
    sdpa, causal = F.scaled_dot_product_attention, llama.causal_attention

    class RoundedF:
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def scaled_dot_product_attention(q, k, v, *args, **kwargs):
            return sdpa(q, int8_rounded(k), int8_rounded(v), *args, **kwargs)
    llama.F = RoundedF()
    llama.causal_attention = lambda q, k, v, *a, **kw: causal(q, int8_rounded(k), int8_rounded(v), *a, **kw)
    rounded = ours.perplexity(text)
    print(f"perplexity with bf16 keys and values {base:.4f}, with int8 {rounded:.4f} ({(rounded / base - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()

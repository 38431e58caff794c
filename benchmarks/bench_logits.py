"""What fp32 logits cost: batch-1 greedy decode of the default model with the output projection
summed and returned in fp32 (what generation does) against logits in the model's dtype (what it
did before), for each inference path, timed in alternation in one process (medians of --runs).

    .venv/bin/python benchmarks/bench_logits.py [--runs 5] [--tokens 128]

Paths: dense bf16 with the decode kernel (where it builds), dense bf16 without it (an fp32 copy of
the output weight), weight-only int4 and int8 (an int8 output projection in both). Beside the
speed, the quality figure the change is for: the first answer token of a prompt whose answer is a
near-tie, its two best logits and their gap, in each dtype.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from machine import cpu_name

PROMPT = "Once upon a time, in a small village, there lived"
NEAR_TIE = "What is the capital of France?"   # fp32: 'The' 25.33 against 'L' 25.24


def variants():
    import llamaforge
    dense, tok = llamaforge.load("default", dtype="bf16", quantize="none", inference=True)
    plain, _ = llamaforge.load("default", dtype="bf16", quantize="none")
    plain.fuse_projections()   # inference=True but for the kernel
    return tok, {"bf16 + kernel": dense, "bf16, no kernel": plain,
                 "int4": llamaforge.load("default", dtype="bf16", quantize="int4", inference=True)[0],
                 "int8": llamaforge.load("default", dtype="bf16", quantize="int8", inference=True)[0]}


@torch.inference_mode()
def decode_speed(model, prompt: torch.Tensor, n: int, fp32: bool) -> float:
    T = prompt.shape[1]
    model.setup_cache(1, T + n + 1)
    token = model(prompt, cache_pos=0, last_only=True, fp32_logits=fp32)[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for i in range(n):
        token = model(token, cache_pos=T + i, fp32_logits=fp32)[:, -1].argmax(-1, keepdim=True)
    return n / (time.perf_counter() - t0)


@torch.inference_mode()
def top2(model, tok, ids: torch.Tensor, fp32: bool) -> str:
    logits = model(ids, cache_pos=None, last_only=True, fp32_logits=fp32)[0, -1]
    (a, b), (i, j) = logits.float().topk(2)
    return f"{tok.decode([int(i)])!r} {float(a):.4f} / {tok.decode([int(j)])!r} {float(b):.4f} (gap {float(a - b):.4f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    from llamaforge.model.generation import encode_prompt
    tok, models = variants()
    print(f"CPU: {cpu_name()}; torch {torch.__version__}")
    prompt = torch.tensor([tok.encode(PROMPT)])
    speeds = {(name, fp32): [] for name in models for fp32 in (False, True)}
    for r in range(args.runs + 1):   # round 0 warms up
        for name, model in models.items():
            for fp32 in (False, True):
                s = decode_speed(model, prompt, args.tokens, fp32)
                if r:
                    speeds[name, fp32].append(s)
    print(f"\nbatch-1 greedy decode, {args.tokens} new tokens, tokens/s (median of {args.runs} rounds)")
    print(f"{'path':18}{'model-dtype logits':>20}{'fp32 logits':>14}{'ratio':>8}")
    for name in models:
        before, after = (statistics.median(speeds[name, f]) for f in (False, True))
        print(f"{name:18}{before:>20.1f}{after:>14.1f}{after / before:>7.3f}x")

    ids = torch.tensor([encode_prompt(tok, NEAR_TIE, chat=True)])
    reference, _ = __import__("llamaforge").load("default", dtype="fp32", quantize="none")
    print(f"\nfirst answer token of {NEAR_TIE!r}, two best logits:")
    print(f"{'fp32 model':18}  {top2(reference, tok, ids, False)}")
    for name, model in models.items():
        for fp32 in (False, True):
            print(f"{name + (', fp32' if fp32 else ', bf16'):18}  {top2(model, tok, ids, fp32)}")


if __name__ == "__main__":
    main()

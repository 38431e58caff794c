"""The serving engine driven in-process, without HTTP: where a batch of requests spends its time.

    .venv/bin/python benchmarks/bench_engine.py [--clients 16] [--new-tokens 128] [--chunk 512]

The default model as `llamaforge serve` loads it (bf16, --quantize auto), one request per client,
all submitted at once: prompts of 64-512 tokens cut from the shipped stories corpus (fixed seed, so
runs compare), greedy, the end of text ignored. Prints output tokens/s and the split between
prefill chunks and decode steps (a step that carries a chunk counts as prefill), so a change to
either shows where it landed. bench_serve.py measures the same through the HTTP API, with peers.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the engine's)")
    ap.add_argument("--kv-cache", choices=["bf16", "int8"], default="bf16", help="as serve's --kv-cache")
    args = ap.parse_args()
    import torch

    from llamaforge.formats.load import load
    from llamaforge.model.generation import PREFILL_CHUNK, SamplingConfig
    from llamaforge.serve.engine import Engine, Request, Scheduler

    print_machine()
    model, tok = load("default", dtype="bf16", quantize="auto", inference=True, batched=True)
    if args.kv_cache == "int8":
        from llamaforge.model.kernels import use_int8_kv_cache
        use_int8_kv_cache(model)
    engine = Engine(model, tok, max_batch=args.clients, chunk=args.chunk or PREFILL_CHUNK, scheduler=Scheduler())
    engine.scheduler.shutdown("driven by this script")   # steps run on this thread instead
    engine.warm_up()
    corpus = tok.encode((Path(__file__).resolve().parent.parent / "llamaforge/datasets/stories/corpus.txt").read_text())
    rng = random.Random(0)
    requests = []
    for _ in range(args.clients):
        n = rng.randint(64, 512)
        start = rng.randint(0, len(corpus) - n - 1)
        requests.append(Request(corpus[start:start + n], SamplingConfig(max_new_tokens=args.new_tokens, temperature=0,
                                                                          ignore_eos=True), lambda event: None))
    engine.waiting.extend(requests)
    prefill = decode = 0.0
    steps = prefill_steps = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        while engine.busy:
            engine.admit()
            chunk = any(s.request and s.request.cached < len(s.request.prompt) for s in engine.slots)
            t = time.perf_counter()
            engine.step()
            if chunk:
                prefill += time.perf_counter() - t
                prefill_steps += 1
            else:
                decode += time.perf_counter() - t
                steps += 1
    total = time.perf_counter() - t0
    tokens = sum(len(r.generated) for r in requests)
    print(f"{args.clients} clients, {sum(len(r.prompt) for r in requests)} prompt tokens, {tokens} new: "
          f"{tokens / total:.1f} tokens/s in {total:.2f} s; steps with a prefill chunk {prefill:.2f} s "
          f"({prefill_steps}), "
          f"decode-only steps {decode:.2f} s ({steps}, {decode / max(steps, 1) * 1000:.1f} ms each)")


if __name__ == "__main__":
    main()

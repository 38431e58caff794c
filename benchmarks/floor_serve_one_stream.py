"""The floor under issue 14's one-stream check (`llamaforge serve` with one client no slower than
`llamaforge generate`): what delivering each token over HTTP costs in CPU time, on the cores that
the model's two threads keep busy.

    .venv/bin/python benchmarks/floor_serve_one_stream.py [--prompts 5] [--new-tokens 128]

In turns on the same prompts (the machine's speed drifts): generate's token loop in this process,
whose time a token is T, then one streaming request to `llamaforge serve` (a subprocess) from this
process, with the CPU time that the server's event-loop thread spent on it (each token's SSE chunk:
the wake-up, JSON, the response, the socket write with its loopback delivery) and this client's
CPU time reading it (the reading thread's own), a token: c. A decode step keeps both cores busy (two threads; the OpenMP
worker spins between parallel regions), so the delivery's CPU time is taken from the step's
threads: one stream through the server takes at least T + c a token. The floor is 1 / (T + c)
tokens/s, T / (T + c) of generate's rate; prints it beside the server's measured rate.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import ROOT, Served, free_port, one_request, prompts  # noqa: E402
from machine import print_machine  # noqa: E402


def thread_cpu_s(pid: int, tid: int) -> float:
    """CPU seconds one thread has run (/proc's schedstat, in nanoseconds: stat's clock ticks of
    10 ms are too coarse for a request's ~20 ms)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    import torch

    from llamaforge.formats.load import load
    from llamaforge.model.generation import SamplingConfig, generate_tokens
    print_machine()
    texts = prompts(args.prompts + 1, seed=1)
    model, tok = load("default", dtype="bf16", quantize="auto", inference=True)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    port = free_port()
    cmd = [str(ROOT / ".venv" / "bin" / "llamaforge"), "serve", "--port", str(port), "--dtype", "bf16", "--quantize", "auto"]
    server = Served("floor", cmd, port, {"ignore_eos": True}, env={"OMP_NUM_THREADS": str(os.cpu_count())})
    rows = {"generate_ms": [], "loop_ms": [], "client_ms": [], "ours_ms": []}
    try:
        pid = server.proc.pid   # the server's main thread runs uvicorn's event loop
        with torch.inference_mode():
            for i, text in enumerate(texts):   # the first turn warms up
                times = [time.perf_counter() for _ in generate_tokens(model, [tok.encode(text)], cfg)]
                loop0, client0 = thread_cpu_s(pid, pid), time.thread_time()
                r = one_request(port, text, args.new_tokens, server.extra)
                loop1, client1 = thread_cpu_s(pid, pid), time.thread_time()
                if i:
                    n = len(r["times"])
                    rows["generate_ms"].append((times[-1] - times[0]) / (len(times) - 1) * 1000)
                    rows["ours_ms"].append((r["times"][-1] - r["times"][0]) / (n - 1) * 1000)
                    rows["loop_ms"].append((loop1 - loop0) / n * 1000)
                    rows["client_ms"].append((client1 - client0) / n * 1000)
    finally:
        server.stop()
    m = {k: statistics.median(v) for k, v in rows.items()}
    T, c = m["generate_ms"], m["loop_ms"] + m["client_ms"]
    floor = 1000 / (T + c)
    ours = 1000 / m["ours_ms"]
    print(f"generate's token loop: {T:.2f} ms a token ({1000 / T:.1f} tokens/s; medians of {args.prompts} prompts)")
    print(f"delivery CPU a token: the server's event loop {m['loop_ms']:.3f} ms + the client {m['client_ms']:.3f} ms "
          f"= {c:.3f} ms")
    print(f"floor for one stream through the server: 1 / ({T:.2f} + {c:.2f}) ms = {floor:.1f} tokens/s "
          f"= {T / (T + c):.3f}x generate")
    print(f"the server, measured: {m['ours_ms']:.2f} ms a token = {ours:.1f} tokens/s = {ours / (1000 / T):.3f}x generate "
          f"= {ours / floor:.3f}x the floor")


if __name__ == "__main__":
    main()

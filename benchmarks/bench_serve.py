"""Serving: `llamaforge serve` against llama.cpp's `llama-server`, llama-cpp-python's server and a
transformers baseline, in one run, on the default SmolLM2, with streaming clients at several
concurrencies.

    .venv/bin/python benchmarks/bench_serve.py --llama-server /path/to/llama-server \\
        [--concurrency 1,4,16,32] [--requests 2] [--new-tokens 128] [--peers ours,llama-server,...]

Each server runs alone (one at a time: two on 2 cores would slow each other) as a subprocess on
a free local port. Clients are threads that each send --requests streaming /v1/completions one
after another; prompts are 64-512 tokens of TinyStories (../shared/data; the shipped stories
without it), every request makes exactly --new-tokens tokens (the end of text is ignored). Per
server and concurrency: aggregate output tokens/s (all tokens over the wall time), p50/p95 time
to first token, p50/p95 time between tokens. Also, for the "no worse than generate" check,
`llamaforge generate`'s single-stream decode tokens/s (the command, and its token loop in this
process) in turns with our server's on the same prompts, and the floor that delivering each token
over HTTP sets under our server's (`one_stream_turns`; `--peers ours --concurrency 1` runs that
check alone).

Peers (each skipped, with a note, when it is not there):
- llama-server: llama.cpp's own server, built from llama.cpp's source with cmake (the path of the
  binary is --llama-server; benchmarks/build_llama_cpp.sh builds it), --parallel slots and
  continuous batching, on the Q4_1 GGUF as stored;
- llama-cpp-python: `python -m llama_cpp.server` (one request at a time), on the same file;
- transformers: one `generate` per request (TextIteratorStreamer) behind the same HTTP shape, bf16.
llamaforge serves the same file in bf16 with --quantize auto (its Q4_1 weights as int4).

Writes benchmarks/results/serve.json and benchmarks/results/serve.png.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORIES = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_val_head.txt"
RESULTS = ROOT / "benchmarks" / "results"
SINGLE_STREAM_REQUESTS = 5   # at one client; also the prompts `llamaforge generate` is timed on
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_name  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts of 64-512 tokens (SmolLM2's tokenizer), cut from real stories."""
    from llamaforge.formats.load import load_checkpoint
    tok = load_checkpoint("default", weights=False).tokenizer
    if STORIES.exists():
        text = STORIES.read_text(encoding="utf-8")
    else:
        text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "llamaforge" / "datasets").rglob("*.txt")))
    ids = tok.encode(text, add_special_tokens=False)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(64, 512)
        start = rng.randrange(0, len(ids) - length)
        out.append(tok.decode(ids[start:start + length]))
    return out


# --- the servers ----------------------------------------------------------------------------------

class Served:
    """A server subprocess on a free port; ready when its /health (or /v1/models) answers."""

    def __init__(self, name: str, cmd: list[str], port: int, extra: dict, env: dict | None = None, ready_timeout=600):
        self.name, self.port, self.extra = name, port, extra
        self.log = open(RESULTS / f"serve-{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: see {self.log.name}")
            for path in ("/health", "/v1/models"):
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    c.request("GET", path)
                    if c.getresponse().status == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not start in {ready_timeout} s")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def start(name: str, args, max_clients: int) -> Served:
    from llamaforge.formats.paths import default_model_path
    gguf = str(default_model_path())
    port = free_port()
    threads = str(args.threads)
    ctx_per_slot = 512 + args.new_tokens + 64
    if name == "ours":
        cmd = [str(ROOT / ".venv" / "bin" / "llamaforge"), "serve", "--port", str(port), "--max-batch", str(max_clients),
               "--max-queue", "256", "--dtype", "bf16", "--quantize", "auto", "--kv-cache", args.kv_cache]
        return Served(name, cmd, port, {"ignore_eos": True}, env={"OMP_NUM_THREADS": threads})
    if name == "llama-server":
        cmd = [args.llama_server, "-m", gguf, "--port", str(port), "--host", "127.0.0.1", "-t", threads, "-tb", threads,
               "--parallel", str(max_clients), "-c", str(ctx_per_slot * max_clients), "--cont-batching",
               "--no-webui"]
        try:
            return Served(name, cmd, port, {"ignore_eos": True})
        except RuntimeError:
            # llama.cpp 0.3.36's weight repacking (its AMX / AVX-512 layouts) crashes at start on an
            # AMX Xeon (segmentation fault after the thread pool starts); without it, it runs.
            print("llama-server exited at start; again with --no-repack (its weights as stored)", file=sys.stderr)
            return Served(name, [*cmd, "--no-repack"], port, {"ignore_eos": True})
    if name == "llama-cpp-python":
        # --interrupt_requests False: by default a new request cuts off the stream in progress.
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--host", "127.0.0.1",
               "--n_ctx", str(ctx_per_slot), "--n_threads", threads, "--n_threads_batch", threads,
               "--interrupt_requests", "False"]
        # Built by build_llama_cpp.sh without llama.cpp of its own: it loads llama-server's libraries.
        env = {"LLAMA_CPP_LIB_PATH": str(Path(args.llama_server).parent)} if args.llama_server else {}
        return Served(name, cmd, port, {"logit_bias": {"0": -100, "2": -100}}, env=env)
    if name == "transformers":
        cmd = [sys.executable, str(Path(__file__)), "--transformers-server", str(port), "--threads", threads]
        return Served(name, cmd, port, {})
    raise ValueError(name)


def transformers_server(port: int, threads: int):
    """The baseline: one `generate` per request, one request at a time, streamed through
    TextIteratorStreamer in the OpenAI completions shape."""
    import asyncio

    import torch
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    from llamaforge.formats.paths import default_model_path
    torch.set_num_threads(threads)
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    lock = threading.Lock()

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def completions(request):
        body = await request.json()
        ids = tok(body["prompt"], return_tensors="pt").input_ids
        n = body.get("max_tokens", 16)
        streamer = TextIteratorStreamer(tok, skip_prompt=True)

        def run():
            with lock, torch.inference_mode():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer,
                               pad_token_id=tok.eos_token_id)
        threading.Thread(target=run, daemon=True).start()

        async def events():
            loop = asyncio.get_running_loop()
            it = iter(streamer)
            while True:
                piece = await loop.run_in_executor(None, next, it, None)
                if piece is None:
                    break
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': piece}]})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/health", health), Route("/v1/completions", completions, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- the clients ----------------------------------------------------------------------------------

def one_request(port: int, prompt: str, n: int, extra: dict) -> dict:
    """Stream one completion; the times of its first and every following text chunk."""
    body = {"model": "default", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, **extra}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = c.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    times = []
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(chunk["error"])
        if chunk.get("choices") and chunk["choices"][0].get("text") is not None and \
                chunk["choices"][0].get("finish_reason") is None:
            times.append(time.perf_counter())
    c.close()
    return {"sent": sent, "times": times}


def level_prompts(texts: list[str], levels: list[int], requests: int) -> dict[int, list[str]]:
    """The prompts of each concurrency, none shared between levels: a server that caches prompts
    (llama-server's slots, our prefix reuse) must not find a later level's prompts computed. One
    client sends several requests in turn, so that one prompt does not decide."""
    out, at = {}, 0
    for clients in levels:
        n = max(requests, SINGLE_STREAM_REQUESTS) if clients == 1 else clients * requests
        out[clients], at = texts[at:at + n], at + n
    return out


def run_level(server: Served, prompts: list[str], clients: int, n: int) -> dict:
    results, errors = [], []
    queue = list(prompts)
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                if not queue:
                    return
                prompt = queue.pop(0)
            try:
                r = one_request(server.port, prompt, n, server.extra)
                with lock:
                    results.append(r)
            except Exception as e:   # counted and reported
                errors.append(str(e))
                return
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["times"][0] - r["sent"] for r in results if r["times"])
    gaps = sorted(b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False))
    tokens = sum(len(r["times"]) for r in results)
    # Each request's own rate, from sending it to its last token (one_stream_turns' end-to-end
    # measure); the level's tokens / wall also counts the client's time between requests.
    per_request = [len(r["times"]) / (r["times"][-1] - r["sent"]) for r in results if r["times"]]
    return {"clients": clients, "requests": len(results), "errors": errors[:3], "tokens": tokens,
            "tokens_per_s": tokens / wall, "wall_s": wall,
            "request_tokens_per_s": statistics.median(per_request) if per_request else float("nan"),
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "tbt_p50": pct(gaps, 50), "tbt_p95": pct(gaps, 95)}


def ratio_to_one_stream(many: dict, one: dict) -> float:
    """Issue 14's ratio: a level's aggregate tokens/s over the single-stream decode rate, the
    1-client level's p50 time between tokens."""
    return many["tokens_per_s"] * one["tbt_p50"]


def repeat_ratio(server: Served, n: int, new_tokens: int) -> list[float]:
    """n more measurements of issue 14's ratio on the same server: a 1-client level (its p50 time
    between tokens gives the single-stream decode rate) then a 16-client level, new prompts each
    time (a prompt the server has seen would find its prefix cached)."""
    ratios = []
    for i in range(n):
        texts = prompts(SINGLE_STREAM_REQUESTS + 16, seed=100 + i)
        one = run_level(server, texts[:SINGLE_STREAM_REQUESTS], 1, new_tokens)
        many = run_level(server, texts[SINGLE_STREAM_REQUESTS:], 16, new_tokens)
        ratios.append(ratio_to_one_stream(many, one))
        print(f"ours, pair {i + 1}: 16 clients {many['tokens_per_s']:.1f} tok/s, one stream "
              f"{1 / one['tbt_p50']:.1f} tok/s: {ratios[-1]:.2f}x", flush=True)
    return ratios


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def cli_generate(text: str, n: int, kv_cache: str = "bf16") -> float:
    """`llamaforge generate` as a user runs it, its stdout read by this process as it streams:
    decode tokens/s from its first text to its last, n tokens in all (--ignore-eos; at ~10 ms a
    token each read is one piece)."""
    cmd = [str(ROOT / ".venv" / "bin" / "llamaforge"), "generate", text, "--max-new-tokens", str(n), "--temperature", "0",
           "--ignore-eos", "--dtype", "bf16", "--quantize", "auto", "--kv-cache", kv_cache]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    times = []
    while chunk := os.read(proc.stdout.fileno(), 65536):
        if chunk.strip():
            times.append(time.perf_counter())
    err = proc.stderr.read().decode()
    if proc.wait() or len(times) < 2:
        raise RuntimeError(f"llamaforge generate failed: {err[-500:]}")
    return (n - 1) / (times[-1] - times[0])


def thread_cpu_s(pid: int, tid: int) -> float:
    """CPU seconds one thread has run (/proc's schedstat, in nanoseconds: stat's clock ticks of
    10 ms are too coarse for a request's ~20 ms)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9


def one_stream_turns(server: Served, texts: list[str], n: int, kv_cache: str = "bf16") -> dict:
    """Our server and `llamaforge generate` in turns on the same prompts, one stream each: the
    machine's speed drifts over a run (10-30% within minutes here), so a figure taken minutes
    apart from the other says more about the drift than about the two. generate twice: the
    command as a user runs it (its stdout streamed to a reader, as the server's tokens are to a
    client), and its token loop in this process with nothing consuming the tokens (what the
    server's step costs without any output). Medians over the prompts: each one's decode tokens/s
    (after the first token) and end-to-end tokens/s (from the request, or the loop's call, to the
    last token; the command's would count its loading); and the CPU time a token of delivering
    the server's stream: its event-loop thread's (the server's main thread: each token's SSE
    chunk, the wake-up, JSON, the response, the socket write with its loopback delivery) and this
    client's reading thread's."""
    import torch

    from llamaforge.formats.load import load
    from llamaforge.model.generation import SamplingConfig, generate_tokens
    model, tok = load("default", dtype="bf16", quantize="auto", inference=True)
    if kv_cache == "int8":
        from llamaforge.model.kernels import use_int8_kv_cache
        use_int8_kv_cache(model)
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, ignore_eos=True)
    rates = {k: [] for k in ("ours_decode", "ours_end_to_end", "cli_decode", "loop_decode", "loop_end_to_end",
                             "loop_cpu_ms", "client_cpu_ms")}
    pid = server.proc.pid
    with torch.inference_mode():
        for i, text in enumerate([texts[0]] + texts):   # the first turn warms up
            loop0, client0 = thread_cpu_s(pid, pid), time.thread_time()
            r = one_request(server.port, text, n, server.extra)
            loop1, client1 = thread_cpu_s(pid, pid), time.thread_time()
            cli = cli_generate(text, n, kv_cache)
            start = time.perf_counter()
            times = [time.perf_counter() for _ in generate_tokens(model, [tok.encode(text)], cfg)]
            if i:
                rates["ours_decode"].append((len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]))
                rates["ours_end_to_end"].append(len(r["times"]) / (r["times"][-1] - r["sent"]))
                rates["cli_decode"].append(cli)
                rates["loop_decode"].append((len(times) - 1) / (times[-1] - times[0]))
                rates["loop_end_to_end"].append(len(times) / (times[-1] - start))
                rates["loop_cpu_ms"].append((loop1 - loop0) / len(r["times"]) * 1000)
                rates["client_cpu_ms"].append((client1 - client0) / len(r["times"]) * 1000)
    return {k: statistics.median(v) for k, v in rates.items()}


# --- the report -----------------------------------------------------------------------------------

def report(all_results: dict, turns: dict | None, levels: list[int]):
    print(f"\nCPU: {cpu_name()}; {os.cpu_count()} cores")
    header = f"{'server':18} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'p95':>7} {'TBT p50':>8} {'p95':>7}  vs llama-server"
    print(header)
    print("-" * len(header))
    ref = {r["clients"]: r for r in all_results.get("llama-server", [])}
    for name, rows in all_results.items():
        for r in rows:
            ratio = f"{r['tokens_per_s'] / ref[r['clients']]['tokens_per_s']:.2f}x" if r["clients"] in ref else ""
            note = f"  errors: {r['errors']}" if r["errors"] else ""
            print(f"{name:18} {r['clients']:>7} {r['tokens_per_s']:>8.1f} {r['ttft_p50']:>8.2f}s {r['ttft_p95']:>6.2f}s "
                  f"{r['tbt_p50'] * 1000:>6.0f}ms {r['tbt_p95'] * 1000:>5.0f}ms  {ratio}{note}")
    ours = {r["clients"]: r for r in all_results.get("ours", [])}
    if turns:
        t = turns
        print(f"\nours, one client, in turns with llamaforge generate on the same {SINGLE_STREAM_REQUESTS} prompts "
              f"(tokens/s, decoding / end to end):\n"
              f"  ours                          {t['ours_decode']:6.1f} / {t['ours_end_to_end']:6.1f}\n"
              f"  llamaforge generate (command) {t['cli_decode']:6.1f} /      -   ours = "
              f"{t['ours_decode'] / t['cli_decode']:.2f}x\n"
              f"  its token loop, no output     {t['loop_decode']:6.1f} / {t['loop_end_to_end']:6.1f}   ours = "
              f"{t['ours_decode'] / t['loop_decode']:.2f}x / {t['ours_end_to_end'] / t['loop_end_to_end']:.2f}x")
        # The floor under the one-stream check: a decode step keeps both cores busy (two threads;
        # the OpenMP worker spins between parallel regions), so delivering a token takes its CPU
        # time from the step: one stream through the server takes at least T + c a token.
        T, c = 1000 / t["loop_decode"], t["loop_cpu_ms"] + t["client_cpu_ms"]
        print(f"  floor for ours: generate's {T:.2f} ms a token + delivery CPU {c:.3f} ms (event loop "
              f"{t['loop_cpu_ms']:.3f} + client {t['client_cpu_ms']:.3f}) = {T / (T + c):.3f}x the loop; ours = "
              f"{t['ours_decode'] / t['loop_decode'] * (T + c) / T:.3f}x the floor")
    if 16 in ours and 1 in ours:
        single = 1 / ours[1]["tbt_p50"]
        print(f"ours at 16 clients: {ours[16]['tokens_per_s']:.1f} tok/s = {ratio_to_one_stream(ours[16], ours[1]):.1f}x our "
              f"single-stream decode ({single:.1f} tok/s from the 1-client p50 time between tokens); p95 time "
              f"between tokens {ours[16]['tbt_p95'] * 1000:.0f} ms")
        if 16 in ref:
            print(f"ours / llama-server at 16 clients: {ours[16]['tokens_per_s'] / ref[16]['tokens_per_s']:.2f}x")


def plot(all_results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, rows in all_results.items():
        c = [r["clients"] for r in rows]
        axes[0].plot(c, [r["tokens_per_s"] for r in rows], "o-", label=name)
        axes[1].plot(c, [r["ttft_p95"] for r in rows], "o-", label=name)
        axes[2].plot(c, [r["tbt_p95"] * 1000 for r in rows], "o-", label=name)
    for ax, title in zip(axes, ["aggregate output tokens/s", "p95 time to first token (s)",
                                "p95 time between tokens (ms)"], strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streaming clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[2].axhline(250, color="grey", linestyle=":", linewidth=1)
    axes[0].legend()
    fig.suptitle(f"Serving SmolLM2-135M (Q4_1 GGUF) on {cpu_name()}; ours is llamaforge serve")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), help="path of llama.cpp's llama-server")
    p.add_argument("--peers", default="ours,llama-server,llama-cpp-python,transformers")
    p.add_argument("--concurrency", default="1,4,16,32")
    p.add_argument("--requests", type=int, default=1, help="requests per client at each concurrency")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--kv-cache", choices=["bf16", "int8"], default="bf16", help="ours: serve's --kv-cache")
    p.add_argument("--repeat-ratio", type=int, default=0, metavar="N",
                   help="ours: N more pairs of a 1-client and a 16-client level (new prompts each), for the median "
                        "of the 16-client / single-stream ratio")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--serial-max-clients", type=int, default=32,
                   help="highest concurrency for the one-at-a-time servers (they queue; it only takes longer)")
    p.add_argument("--transformers-server", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.transformers_server:
        return transformers_server(args.transformers_server, args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in args.concurrency.split(",")]
    per_level = level_prompts(prompts(sum(max(c * args.requests, SINGLE_STREAM_REQUESTS) for c in levels)), levels,
                              args.requests)
    single = per_level.get(1) or next(iter(per_level.values()))
    results: dict[str, list] = {}
    turns, ratios = None, []
    for name in args.peers.split(","):
        if name == "llama-server" and not (args.llama_server and Path(args.llama_server).exists()):
            print("llama-server: skipped (give --llama-server PATH; benchmarks/build_llama_cpp.sh builds it)")
            continue
        if name == "llama-cpp-python":
            import importlib.util
            if importlib.util.find_spec("llama_cpp") is None:
                print("llama-cpp-python: skipped (not installed; benchmarks/build_llama_cpp.sh installs it)")
                continue
        server = start(name, args, max(levels))
        try:
            one_request(server.port, "Hello, world.", 8, server.extra)   # warm up (not a benchmark prompt: no cache)
            results[name] = []
            for clients in levels:
                if name in ("llama-cpp-python", "transformers") and clients > args.serial_max_clients:
                    continue
                r = run_level(server, per_level[clients], clients, args.new_tokens)
                results[name].append(r)
                print(f"{name:18} {clients:>3} clients: {r['tokens_per_s']:7.1f} tok/s, TTFT p95 {r['ttft_p95']:.2f} s, "
                      f"TBT p95 {r['tbt_p95'] * 1000:.0f} ms", flush=True)
            if name == "ours":   # the single-stream check: the server idle between its turns
                turns = one_stream_turns(server, single[:SINGLE_STREAM_REQUESTS], args.new_tokens, args.kv_cache)
                ratios = repeat_ratio(server, args.repeat_ratio, args.new_tokens) if args.repeat_ratio else []
        finally:
            server.stop()
    report(results, turns, levels)
    ours = {r["clients"]: r for r in results.get("ours", [])}
    if ratios and 1 in ours and 16 in ours:
        ratios.insert(0, ratio_to_one_stream(ours[16], ours[1]))
        print(f"16 clients / single-stream decode over {len(ratios)} pairs of levels: "
              f"{', '.join(f'{r:.2f}x' for r in ratios)}; median {statistics.median(ratios):.2f}x")
    out = {"cpu": cpu_name(), "threads": args.threads, "new_tokens": args.new_tokens, "kv_cache": args.kv_cache, "requests_per_client": args.requests,
           "one_stream_turns_tokens_per_s": turns, "ratio_16_to_one_stream": ratios, "results": results}
    tmp = RESULTS / "serve.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, RESULTS / "serve.json")
    plot(results, RESULTS / "serve.png")
    print(f"\nwrote {RESULTS / 'serve.json'} and {RESULTS / 'serve.png'}")


if __name__ == "__main__":
    main()

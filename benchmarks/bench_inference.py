"""Inference speed: llamaforge against HF transformers on the same SmolLM2 GGUF, in one run.

    .venv/bin/python benchmarks/bench_inference.py [--runs 3] [--dtypes fp32,bf16]

Each (implementation, dtype) is measured in its own process, so peak memory is its own. Printed
per dtype, side by side with the ratio: load time (GGUF file to a model ready to generate),
batch-1 greedy decode tokens/s (128 new tokens), prefill tokens/s (512-token prompt), peak RSS,
and, for llamaforge, perplexity on held-out text (the quality figure next to every speed-up).
Figures are medians of --runs runs. This machine's absolute numbers drift; the ratios hold.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_val_head.txt"
FALLBACK_TEXT = (
    "The llama is a domesticated South American camelid, widely used as a meat and pack animal by "
    "Andean cultures since the pre-Columbian era. Llamas are social animals and live with others as "
    "a herd. Their wool is soft and contains only a small amount of lanolin. Llamas can learn simple "
    "tasks after a few repetitions. When using a pack, they can carry about 25 to 30% of their body "
    "weight for 8 to 13 km. ") * 8


def held_out_text() -> str:
    if HELD_OUT.exists():  # real text when ../shared/data is beside the checkout
        return HELD_OUT.read_text(encoding="utf-8")[200_000:206_000]
    return FALLBACK_TEXT


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker_transformers(dtype: str, runs: int, new_tokens: int, prompt_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamaforge.formats import default_model_path
    torch.set_num_threads(os.cpu_count())
    path = default_model_path()
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dt).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    load = time.perf_counter() - t
    prompt = torch.tensor([tok.encode("Once upon a time, in a small village, there lived")])
    long_prompt = torch.randint(100, 40000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=8, do_sample=False)  # warm-up
        decode = timed(lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                              do_sample=False, pad_token_id=tok.pad_token_id), runs)
        model(long_prompt, logits_to_keep=1)
        prefill = timed(lambda: model(long_prompt, logits_to_keep=1), runs)
    return {"load_s": load, "decode_tok_s": new_tokens / decode, "prefill_tok_s": prompt_tokens / prefill,
            "peak_rss_mb": peak_rss_mb()}


def perplexity(model, tok, text: str, window: int = 512) -> float:
    """Perplexity over consecutive non-overlapping windows of the held-out text."""
    import torch
    import torch.nn.functional as F
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    n = (len(ids) - 1) // window * window
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, n, window):
            x = ids[s:s + window + 1]
            logits = model(x[None, :-1]).float()
            total += F.cross_entropy(logits[0], x[1:], reduction="sum").item()
            count += len(x) - 1
    return float(torch.exp(torch.tensor(total / count)))


def worker_llamaforge(dtype: str, runs: int, new_tokens: int, prompt_tokens: int, quantize: str | None) -> dict:
    import torch

    import llamaforge
    from llamaforge.generate import SamplingConfig, generate_tokens
    torch.set_num_threads(os.cpu_count())
    t = time.perf_counter()
    model, tok = llamaforge.load("default", dtype=dtype, quantize=quantize)
    load = time.perf_counter() - t
    prompt = tok.encode("Once upon a time, in a small village, there lived")
    long_prompt = torch.randint(100, 40000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    list(generate_tokens(model, [prompt], SamplingConfig(max_new_tokens=8, temperature=0)))  # warm-up
    decode = timed(lambda: list(generate_tokens(model, [prompt], cfg)), runs)
    with torch.inference_mode():
        model(long_prompt, last_only=True)
        prefill = timed(lambda: model(long_prompt, last_only=True), runs)
    return {"load_s": load, "decode_tok_s": new_tokens / decode, "prefill_tok_s": prompt_tokens / prefill,
            "peak_rss_mb": peak_rss_mb(), "perplexity": perplexity(model, tok, held_out_text())}


def run_worker(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode:
        sys.exit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        impl, dtype, runs, new, prompt, *rest = a.worker
        quantize = rest[0] if rest and rest[0] != "none" else None
        res = (worker_transformers(dtype, int(runs), int(new), int(prompt)) if impl == "transformers"
               else worker_llamaforge(dtype, int(runs), int(new), int(prompt), quantize))
        print(json.dumps(res))
        return

    print(f"SmolLM2-135M-Instruct Q4_1 GGUF, {os.cpu_count()} threads, medians of {a.runs} runs; "
          f"held-out text: {'TinyStories (shared/data)' if HELD_OUT.exists() else 'built-in paragraph'}")
    fp32_ppl = None
    for dtype in a.dtypes.split(","):
        ref = run_worker("transformers", dtype, a.runs, a.new_tokens, a.prompt_tokens)
        variants = [("llamaforge", None)] + ([("llamaforge int8", "int8")] if dtype == "bf16" else [])
        print(f"\n== {dtype} ==")
        print(f"{'':28}{'transformers':>14}" + "".join(f"{name:>18}{'ratio':>8}" for name, _ in variants))
        results = [run_worker("llamaforge", dtype, a.runs, a.new_tokens, a.prompt_tokens, q or "none")
                   for _, q in variants]
        rows = [("load time (s)", "load_s", True), ("decode tokens/s (128 new)", "decode_tok_s", False),
                ("prefill tokens/s (512)", "prefill_tok_s", False), ("peak RSS (MB)", "peak_rss_mb", True)]
        for label, key, lower_better in rows:
            line = f"{label:28}{ref[key]:>14.2f}"
            for r in results:
                ratio = ref[key] / r[key] if lower_better else r[key] / ref[key]
                line += f"{r[key]:>18.2f}{ratio:>7.2f}x"
            print(line)
        if dtype == "fp32":
            fp32_ppl = results[0]["perplexity"]
        line = f"{'perplexity (held-out)':28}{'':>14}"
        for r in results:
            rel = f"{(r['perplexity'] / fp32_ppl - 1) * 100:+.2f}%" if fp32_ppl else ""
            line += f"{r['perplexity']:>18.3f}{rel:>8}"
        print(line)
    print("\nratio: llamaforge over transformers (for load time and memory: transformers over llamaforge), "
          "so > 1 is better; perplexity change is against llamaforge fp32.")


if __name__ == "__main__":
    main()

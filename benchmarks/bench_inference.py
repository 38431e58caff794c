"""Inference speed: llamaforge against HF transformers on the same SmolLM2 GGUF, in one run.

    .venv/bin/python benchmarks/bench_inference.py [--runs 5] [--dtypes fp32,bf16] [--no-quant]

Per dtype it prints, side by side with the ratio:
- load time (GGUF file to a model ready to generate) and peak RSS (load, one generation and one
  512-token prefill), each implementation in a process of its own so the memory is its own;
- batch-1 greedy decode tokens/s (128 new tokens) and prefill tokens/s (512-token prompt), with
  every implementation loaded in one process and timed in alternation, round after round, so
  that drift of this machine hits all of them alike (medians of --runs rounds);
- for llamaforge, perplexity on held-out text: the quality figure next to every speed-up;
- llama.cpp on the same file as a further column, when llama-cpp-python is installed.
Variants in bf16: plain (with the decode kernel of model/kernels.py where it builds), plain with the
decode step compiled (`--compile`), weight-only int8, weight-only int4 (groups of 32), and int4
compiled.
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
PROMPT = "Once upon a time, in a small village, there lived"



sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402


def held_out_text() -> str:
    if HELD_OUT.exists():  # real text when ../shared/data is beside the checkout
        return HELD_OUT.read_text(encoding="utf-8")[200_000:206_000]
    return FALLBACK_TEXT


class Transformers:
    name = "transformers"

    def __init__(self, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llamaforge.formats.paths import default_model_path
        path = default_model_path()
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dt).eval()
        self.tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        self.prompt = torch.tensor([self.tok.encode(PROMPT)])

    def decode(self, n: int):
        import torch
        with torch.inference_mode():
            self.model.generate(self.prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=self.tok.pad_token_id)

    def prefill(self, ids):
        import torch
        with torch.inference_mode():
            self.model(ids, logits_to_keep=1)


class Llamaforge:
    def __init__(self, dtype: str, variant: str):
        import llamaforge
        self.name = "llamaforge" if variant == "plain" else variant
        self.compile = variant.endswith("compile")
        quantize = variant.split("+")[0]
        # As the command line runs it: projections fused for inference.
        self.model, self.tok = llamaforge.load("default", dtype=dtype, inference=True,
                                               quantize=quantize if quantize in ("int8", "int4") else None)
        self.prompt = self.tok.encode(PROMPT)

    def decode(self, n: int):
        from llamaforge.model.generation import SamplingConfig, generate_tokens
        cfg = SamplingConfig(max_new_tokens=n, temperature=0, ignore_eos=True)
        list(generate_tokens(self.model, [self.prompt], cfg, compile=self.compile))

    def prefill(self, ids):
        import torch
        with torch.inference_mode():
            self.model(ids, last_only=True)

    def perplexity(self, text: str, window: int = 512) -> float:
        """Perplexity over consecutive non-overlapping windows of the held-out text."""
        import torch
        import torch.nn.functional as F
        ids = torch.tensor(self.tok.encode(text, add_special_tokens=False))
        n = (len(ids) - 1) // window * window
        total = 0.0
        with torch.inference_mode():
            for s in range(0, n, window):
                x = ids[s:s + window + 1]
                total += F.cross_entropy(self.model(x[None, :-1])[0].float(), x[1:], reduction="sum").item()
        return float(torch.exp(torch.tensor(total / n)))


class LlamaCpp:
    """llama.cpp through llama-cpp-python (optional: `pip install llama-cpp-python` builds it),
    on the GGUF as stored (Q4_1); the dtype does not apply."""
    name = "llama.cpp"

    def __init__(self, dtype: str):
        from llama_cpp import Llama

        from llamaforge.formats.paths import default_model_path
        self.llm = Llama(model_path=str(default_model_path()), n_ctx=1024, n_batch=512,
                         n_threads=os.cpu_count(), verbose=False)
        self.prompt = self.llm.tokenize(PROMPT.encode())

    def decode(self, n: int):
        for i, _ in enumerate(self.llm.generate(self.prompt, top_k=1, temp=0.0, reset=True)):
            if i + 1 >= n:
                break

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids[0].tolist())


def llama_cpp_available() -> bool:
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:   # installed, but its shared library may be missing (a wheel built elsewhere)
        import llama_cpp  # noqa: F401
    except (OSError, RuntimeError) as e:
        print(f"llama-cpp-python is installed but does not load ({e}): its column is left out", file=sys.stderr)
        return False
    return True


def make(impl: str, dtype: str):
    if impl == "transformers":
        return Transformers(dtype)
    if impl == "llama.cpp":
        return LlamaCpp(dtype)
    return Llamaforge(dtype, impl)


def worker_memory(impl: str, dtype: str) -> dict:
    """Load time and peak RSS of one implementation alone in this process."""
    import torch
    torch.set_num_threads(os.cpu_count())
    t = time.perf_counter()
    m = make(impl, dtype)
    load = time.perf_counter() - t
    m.decode(16)
    m.prefill(torch.randint(100, 40000, (1, 512)))
    return {"load_s": load, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker_speed(impls: list[str], dtype: str, runs: int, new_tokens: int, prompt_tokens: int) -> dict:
    """Every implementation in this one process, timed in alternation."""
    import torch
    torch.set_num_threads(os.cpu_count())
    models = [make(i, dtype) for i in impls]
    long_prompt = torch.randint(100, 40000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    first_call = {}
    for m in models:  # warm-up; for a compiled variant this is where compilation happens
        t = time.perf_counter()
        m.decode(8)
        first_call[m.name] = time.perf_counter() - t
        m.prefill(long_prompt)
    decode = {m.name: [] for m in models}
    prefill = {m.name: [] for m in models}
    for _ in range(runs):
        for m in models:
            t = time.perf_counter()
            m.decode(new_tokens)
            decode[m.name].append(new_tokens / (time.perf_counter() - t))
            t = time.perf_counter()
            m.prefill(long_prompt)
            prefill[m.name].append(prompt_tokens / (time.perf_counter() - t))
    text = held_out_text()
    return {m.name: {"decode_tok_s": statistics.median(decode[m.name]),
                     "prefill_tok_s": statistics.median(prefill[m.name]),
                     "first_call_s": first_call[m.name],
                     "perplexity": m.perplexity(text) if isinstance(m, Llamaforge) else None}
            for m in models}


def run_worker(kind: str, *args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, *map(str, args)], capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(f"worker {kind} {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--no-quant", action="store_true", help="skip the int8 / int4 / compiled int4 variants")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, dtype, *impls = a.worker
        res = (worker_memory(impls[0], dtype) if kind == "memory"
               else worker_speed(impls, dtype, a.runs, a.new_tokens, a.prompt_tokens))
        print(json.dumps(res))
        return

    print_machine()
    print(f"SmolLM2-135M-Instruct Q4_1 GGUF, {os.cpu_count()} threads, medians of {a.runs} alternating rounds; "
          f"held-out text: {'TinyStories (shared/data)' if HELD_OUT.exists() else 'built-in paragraph'}")
    fp32_ppl = None
    for dtype in a.dtypes.split(","):
        impls = ["plain"] + (["plain+compile", "int8", "int4", "int4+compile"] if dtype == "bf16" and not a.no_quant
                             else [])
        if dtype == "bf16" and llama_cpp_available():
            impls.append("llama.cpp")
        speed = run_worker("speed", dtype, "transformers", *impls, "--runs", a.runs, "--new-tokens",
                           a.new_tokens, "--prompt-tokens", a.prompt_tokens)
        memory = {i: run_worker("memory", dtype, i) for i in ["transformers"] + impls}
        names = ["llamaforge" if i == "plain" else i for i in impls]
        ours = [n for n in names if n != "llama.cpp"]
        res = {n: {**speed[n], **memory[i]} for n, i in zip(["transformers"] + names, ["transformers"] + impls, strict=True)}
        ref = res["transformers"]
        print(f"\n== {dtype} ==")
        print(f"{'':28}{'transformers':>14}" + "".join(f"{n:>16}{'ratio':>8}" for n in names))
        rows = [("load time (s)", "load_s", True), ("decode tokens/s (128 new)", "decode_tok_s", False),
                ("prefill tokens/s (512)", "prefill_tok_s", False), ("peak RSS (MB)", "peak_rss_mb", True)]
        for label, key, lower_better in rows:
            line = f"{label:28}{ref[key]:>14.2f}"
            for n in names:
                ratio = ref[key] / res[n][key] if lower_better else res[n][key] / ref[key]
                line += f"{res[n][key]:>16.2f}{ratio:>7.2f}x"
            print(line)
        if dtype == "fp32":
            fp32_ppl = res["llamaforge"]["perplexity"]
        line = f"{'perplexity (held-out)':28}{'':>14}"
        for n in ours:
            rel = f"{(res[n]['perplexity'] / fp32_ppl - 1) * 100:+.2f}%" if fp32_ppl else ""
            line += f"{res[n]['perplexity']:>16.3f}{rel:>8}"
        print(line)
        print(f"{'first generate call (s)':28}{ref['first_call_s']:>14.2f}"
              + "".join(f"{res[n]['first_call_s']:>16.2f}{'':>8}" for n in names))
    print("\nratio: over transformers (load time and memory: transformers over the column), so > 1 is better. "
          "Perplexity change is against llamaforge fp32. First call includes compilation. llama.cpp (when "
          "llama-cpp-python is installed) runs the Q4_1 file as stored.")


if __name__ == "__main__":
    main()

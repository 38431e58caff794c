"""What a Chinese-capable model of Qwen2.5-0.5B's size costs here: decode and prefill tokens/s of a
random-weight model of that shape (494M parameters, 151,936-token vocabulary, q/k/v biases,
tied embeddings) in bf16, llamaforge against transformers' own Qwen2ForCausalLM on the same
weights, in one process, taking turns.

    .venv/bin/python benchmarks/bench_families.py [--rounds 3] [--new-tokens 64] [--prompt-tokens 512]

Decode: batch-1 greedy tokens/s after the prompt (16 tokens), medians of --rounds; prefill: a
--prompt-tokens prompt's forward pass into the KV cache, tokens/s. Writes
benchmarks/results/families.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_name  # noqa: E402

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True, rms_norm_eps=1e-6)


def make_model(out: Path):
    """A random Qwen2ForCausalLM of the shape, bf16, saved with the default model's tokenizer
    (its ids are a subset of the vocabulary; speed does not depend on the text)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llamaforge.formats.load import load_checkpoint
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).to(torch.bfloat16).eval()
    model.save_pretrained(out)
    load_checkpoint("default", weights=False).tokenizer.save_hf(out)
    return model


def ours_rates(model, prompt: list[int], new: int, long_prompt: list[int]) -> tuple[float, float]:
    from llamaforge.model.generation import SamplingConfig, generate_tokens
    cfg = SamplingConfig(max_new_tokens=new, temperature=0, ignore_eos=True)
    with torch.inference_mode():
        t0 = time.perf_counter()
        first = None
        for i, _ in enumerate(generate_tokens(model, [prompt], cfg)):
            if i == 0:
                first = time.perf_counter()
        decode = (new - 1) / (time.perf_counter() - first)
        model.setup_cache(1, len(long_prompt) + 1)
        t0 = time.perf_counter()
        model(torch.tensor([long_prompt]), cache_pos=0, last_only=True)
        prefill = len(long_prompt) / (time.perf_counter() - t0)
    return decode, prefill


def hf_rates(model, prompt: list[int], new: int, long_prompt: list[int]) -> tuple[float, float]:
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        decode = (new - 1) / (time.perf_counter() - t0 - one)
        t0 = time.perf_counter()
        model(torch.tensor([long_prompt]), use_cache=True)
        prefill = len(long_prompt) / (time.perf_counter() - t0)
    return decode, prefill


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    args = ap.parse_args()
    from llamaforge.formats.load import load
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (16,), generator=g).tolist()
    long_prompt = torch.randint(100, 40000, (args.prompt_tokens,), generator=g).tolist()
    with tempfile.TemporaryDirectory() as d:
        theirs = make_model(Path(d))
        ours, _ = load(d, dtype="bf16", inference=True)
    n_params = sum(p.numel() for p in theirs.parameters())
    rates = {"llamaforge": [], "transformers": []}
    for r in range(args.rounds):
        rates["llamaforge"].append(ours_rates(ours, prompt, args.new_tokens, long_prompt))
        rates["transformers"].append(hf_rates(theirs, prompt, args.new_tokens, long_prompt))
        print(f"round {r + 1}: " + ", ".join(f"{k} decode {v[-1][0]:.1f} / prefill {v[-1][1]:.0f} tokens/s"
                                             for k, v in rates.items()), flush=True)
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in rates.items()}
    print(f"\nQwen2.5-0.5B shape, random weights ({n_params / 1e6:.0f}M parameters), bf16, {cpu_name()}:")
    print("| | decode tokens/s (batch 1) | prefill tokens/s |")
    print("|---|---|---|")
    for k in ("transformers", "llamaforge"):
        print(f"| {k} | {med[k][0]:.1f} | {med[k][1]:.0f} |")
    print(f"| ratio | {med['llamaforge'][0] / med['transformers'][0]:.2f}x | "
          f"{med['llamaforge'][1] / med['transformers'][1]:.2f}x |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "families.json").write_text(json.dumps({"cpu": cpu_name(), "parameters": n_params, "rounds": rates,
                                                       "medians": med}, indent=2) + "\n")


if __name__ == "__main__":
    main()

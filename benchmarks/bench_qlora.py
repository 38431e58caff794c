"""QLoRA: the memory that LoRA training takes over a bf16, an int8 and an int4 base.

    .venv/bin/python benchmarks/bench_qlora.py smollm2 [--epochs 2]
    .venv/bin/python benchmarks/bench_qlora.py 7b [--steps 2] [--context 2048]

smollm2: `llamaforge finetune classify` on the shipped sentiment set, LoRA r16, bf16, once per
base, each in a process of its own: the process's peak resident memory (loading included), the
trainer's peak while training, the dev accuracy of the best model and the wall time.

7b: a random-weight model of Llama 2 7B's shape (6.7B parameters), LoRA r16 on every linear
layer over an int4 base, one sequence of --context tokens a step, gradient checkpointing, bf16.
The model is built a layer at a time on the meta device and each weight quantised as it is
made, so its bf16 weights (12.6 GB) never exist at once. Prints tokens/s and peak resident memory
of the measured steps, the trainer's memory estimate for this run, and the estimate for the same
run over a bf16 base (what the same steps would need, not run here).

Writes benchmarks/results/qlora-smollm2.json or qlora-7b.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_name  # noqa: E402

BASES = ["none", "int8", "int4"]


def smollm2(args):
    data = ROOT / "llamaforge" / "datasets" / "sentiment"
    rows = []
    for base in BASES:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "llamaforge", "finetune", "classify", "--train", str(data / "train.csv"),
                   "--dev", str(data / "dev.csv"), "--out", str(out), "--epochs", str(args.epochs),
                   "--batch-size", "16", "--seed", "0"]
            if base != "none":
                cmd += ["--quantize-base", base]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - t0
            err = proc.stderr.read()
            if proc.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
            metrics = json.loads((out / "metrics.json").read_text())
            best = max(metrics["evals"], key=lambda e: e["accuracy"])
            rows.append({"base": "bf16" if base == "none" else base, "peak_rss_mb": usage.ru_maxrss // 1024,
                         "training_peak_mb": metrics["peak_memory_mb"], "dev_accuracy": best["accuracy"],
                         "dev_macro_f1": best.get("macro_f1"), "wall_s": round(wall, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nSmolLM2-135M, LoRA r16 classification, shipped sentiment set, {args.epochs} epochs of batch 16, "
          f"bf16 ({cpu_name()}):")
    print("| base | peak RSS (process) | peak while training | dev accuracy | wall |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['base']} | {r['peak_rss_mb']} MB | {r['training_peak_mb']} MB | {r['dev_accuracy']:.3f} | "
              f"{r['wall_s']:.0f} s |")
    return {"cpu": cpu_name(), "epochs": args.epochs, "runs": rows}


def random_quantized_llama(preset: str, bits: int | None, rank: int, seed: int = 0):
    """A random-weight Llama of `preset`'s shape with LoRA on every linear, its frozen linears
    quantised to `bits` as each is made (None: bf16 weights, on the meta device: for the estimate)."""
    import torch
    import torch.nn as nn

    from llamaforge.model.adapters import LoRAConfig, add_lora
    from llamaforge.model.config import LlamaConfig
    from llamaforge.model.llama import Llama

    cfg = LlamaConfig.from_name(preset)
    with torch.device("meta"):
        model = Llama(cfg).to(torch.bfloat16)
    add_lora(model, LoRAConfig(rank=rank, alpha=2 * rank, dropout=0.0))
    if bits is None:
        return model
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.weight = nn.Parameter(randn(m.out_features, m.in_features), requires_grad=False)
            m.quantize_base(bits)   # one layer's bf16 weight at a time
            m.lora_A = nn.Parameter(randn(rank, m.in_features, std=1 / math.sqrt(m.in_features)))
            m.lora_B = nn.Parameter(torch.zeros(m.out_features, rank, dtype=torch.bfloat16))
    model.embed_tokens.weight = nn.Parameter(randn(cfg.vocab_size, cfg.dim), requires_grad=False)
    if model.lm_head is not None:
        model.lm_head.weight = nn.Parameter(randn(cfg.vocab_size, cfg.dim), requires_grad=False)
    for name, p in list(model.named_parameters()):
        if p.is_meta:   # the norms
            module = model.get_submodule(name.rsplit(".", 1)[0])
            module.weight = nn.Parameter(torch.ones(p.shape, dtype=torch.bfloat16), requires_grad=False)
    return model


def resident_mb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) // 1024


def seven_b(args):
    import torch

    from llamaforge.evaluate.lm import next_token_loss
    from llamaforge.train.memory import estimate_training_memory, human_bytes, peak_memory, reset_peak_memory
    from llamaforge.train.trainer import optimizer_groups
    torch.set_num_threads(os.cpu_count())
    before = resident_mb()
    t0 = time.perf_counter()
    model = random_quantized_llama(args.preset, 4, args.rank)
    built_s = time.perf_counter() - t0
    model.gradient_checkpointing(True).train()
    built = resident_mb()
    n_params = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if hasattr(m, "lora_A"))
    estimates = {}
    for name, m in (("int4", model), ("bf16", random_quantized_llama(args.preset, None, args.rank))):
        estimates[name] = estimate_training_memory(m, micro_batch_size=1, seq_len=args.context,
                                                   gradient_checkpointing=True)
    print(f"{args.preset} shape, {n_params / 1e9:.2f}B parameters, int4 base built in {built_s:.0f} s: "
          f"resident {built - before} MB above the imports", flush=True)
    # The trainer's step: fp32 masters for the bf16 adapters, fused AdamW on them.
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    masters = [(n, p.detach().float().clone().requires_grad_(True)) for n, p in params]
    opt = torch.optim.AdamW(optimizer_groups(masters, 0.0), lr=1e-4, fused=True)
    ids = torch.randint(3, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    times, losses = [], []
    reset_peak_memory("cpu")
    for step in range(args.steps + 1):   # the first step warms up (allocations, kernels)
        t = time.perf_counter()
        loss, _ = next_token_loss(model, ids, ids)
        loss.backward()
        for (_, m), (_, p) in zip(masters, params, strict=True):
            m.grad, p.grad = p.grad.float(), None
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for (_, m), (_, p) in zip(masters, params, strict=True):
                p.copy_(m)
        dt = time.perf_counter() - t
        losses.append(float(loss.detach()))
        if step:
            times.append(dt)
        print(f"step {step}{' (warm-up)' if not step else ''}: {dt:.1f} s, loss {float(loss.detach()):.4f}, "
              f"peak {(peak_memory('cpu') or 0) / 2**20:.0f} MB", flush=True)
    peak = peak_memory("cpu")
    step_s = statistics.median(times)
    result = {"cpu": cpu_name(), "shape": args.preset, "parameters": n_params, "context": args.context,
              "lora_rank": args.rank, "base": "int4", "build_seconds": round(built_s, 1),
              "step_seconds": [round(t, 1) for t in times], "tokens_per_second": round(args.context / step_s, 2),
              "peak_resident_mb": round(peak / 2**20), "imports_mb": before, "losses": losses,
              "estimate_int4_mb": round(estimates["int4"].total / 2**20),
              "estimate_bf16_mb": round(estimates["bf16"].total / 2**20),
              "estimate_int4": estimates["int4"].format(), "estimate_bf16": estimates["bf16"].format()}
    print(f"\n{args.preset} shape (random weights), LoRA r{args.rank} over an int4 base, 1 x {args.context} tokens a "
          f"step, gradient checkpointing, bf16 ({cpu_name()}):")
    print(f"  {step_s:.0f} s a step (median of {len(times)}), {args.context / step_s:.1f} tokens/s")
    print(f"  peak resident memory {human_bytes(peak)} (imports {before} MB); "
          f"estimated {human_bytes(estimates['int4'].total)} (x{estimates['int4'].total / (peak - before * 2**20):.2f} "
          f"of the measured peak above the imports)")
    print(f"  the same run over a bf16 base: estimated {human_bytes(estimates['bf16'].total)}")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["smollm2", "7b"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--preset", default="llama2-7b", help="the model shape (7b part; a small one to try the script)")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = smollm2(args) if args.part == "smollm2" else seven_b(args)
    (RESULTS / f"qlora-{args.part}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

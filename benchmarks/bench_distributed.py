"""Distributed fine-tuning on one machine: SmolLM2 with LoRA (DDP) and full fine-tuning (FSDP2),
on 1 and on 2 processes of one thread each, in one run.

    .venv/bin/python benchmarks/bench_distributed.py [--steps 8] [--batch-size 8] [--max-length 128]

Each configuration is `llamaforge finetune sft` on the shipped instructions (bf16, the same
global batch), run alone. Per configuration: training tokens/s (all ranks' tokens over rank 0's
training time, evaluation excluded, from the run's checkpoint), and per rank the peak resident
memory (VmHWM, polled from /proc while it runs) and the steady memory while training (the
largest VmRSS seen after the first checkpoint). Scaling efficiency = tokens/s on 2 processes /
(2 x tokens/s on 1). For FSDP the memory that sharding splits (parameters, gradients, optimiser
state) is set beside llamaforge's own estimate (`train/memory.py`) when there is one.

Two processes on 2 cores each take one core, where one process of one thread leaves a core idle:
this measures what the distributed engine costs and saves, not a faster machine.
Writes benchmarks/results/distributed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "llamaforge" / "datasets" / "instructions" / "train.jsonl"
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_name  # noqa: E402


def tree(pid: int) -> list[int]:
    """pid and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        todo += [int(k) for k in kids]
    return out


def status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def is_worker(pid: int) -> bool:
    """A process that trains: `-m llamaforge` itself, or a child of torchrun's."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"llamaforge" in part for part in cmd) and b"torch.distributed.run" not in cmd


def run(method: str, nproc: int, args, out: Path) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "llamaforge"), "finetune", "sft", "--train", str(DATA), "--out", str(out),
           "--method", method, "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--samples", "0", "--eval-every", str(10 ** 6), "--save-every",
           str(max(1, args.steps // 3)), "--dev-fraction", "0.02", "--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak: dict[int, int] = {}
    steady: dict[int, int] = {}
    while job.poll() is None:
        training = (out / "checkpoint" / "latest").exists()
        for pid in tree(job.pid):
            if is_worker(pid):
                hwm, rss = status_kb(pid, "VmHWM"), status_kb(pid, "VmRSS")
                if hwm:
                    peak[pid] = max(peak.get(pid, 0), hwm)
                if rss and training:
                    steady[pid] = max(steady.get(pid, 0), rss)
        time.sleep(0.2)
    err = job.stderr.read()
    if job.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    if nproc > 1:   # the command's own process became torchrun (exec): not a rank
        peak.pop(job.pid, None)
        steady.pop(job.pid, None)
    from llamaforge.train.checkpoint import read_meta
    state = read_meta(out / "checkpoint")["state"]
    return {"method": method, "processes": nproc, "steps": state["step"], "tokens": state["tokens"],
            "train_seconds": state["train_seconds"], "tokens_per_s": state["tokens"] / state["train_seconds"],
            "peak_mb_per_rank": sorted(round(v / 1024) for v in peak.values()),
            "training_mb_per_rank": sorted(round(v / 1024) for v in steady.values())}


MATMUL = """
import time, torch
a, b = torch.randn(1024, 1024, dtype=torch.bfloat16), torch.randn(1024, 1024, dtype=torch.bfloat16)
for _ in range(20): a @ b
n, t = 0, time.perf_counter()
while time.perf_counter() - t < 4: a @ b; n += 1
print(2 * 1024 ** 3 * n / (time.perf_counter() - t) / 1e9)
"""


def machine_ceiling() -> tuple[float, float]:
    """(bf16 matmul GFLOP/s of one single-threaded process alone, and of each of two at once):
    the scaling a 2-process run could reach at best on this machine, with no communication."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", MATMUL]
    alone = float(subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout)
    pair = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    each = [float(p.communicate()[0]) for p in pair]
    return alone, sum(each) / 2


def imports_mb() -> int:
    """A training process's memory before any model: what the estimate leaves out."""
    code = ("import torch, torch.distributed, llamaforge.train.trainer, llamaforge.formats.load\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) // 1024


def estimate(method: str, nproc: int, args) -> dict | None:
    """llamaforge's own estimate for the configuration, where train/memory.py exists."""
    try:
        from llamaforge.train import memory
    except ImportError:
        return None
    from llamaforge.formats.load import load
    from llamaforge.model.adapters import LoRAConfig, add_lora
    model, _ = load("default", dtype="bf16")
    if method == "lora":
        add_lora(model, LoRAConfig(rank=16, alpha=32))
    else:
        model.requires_grad_(True)
    micro = max(1, args.batch_size // nproc)
    est = memory.estimate_training_memory(model, micro_batch_size=micro, seq_len=args.max_length,
                                          strategy=("ddp" if method == "lora" else "fsdp") if nproc > 1 else "single",
                                          world_size=nproc)
    return {k: round(v / 2 ** 20) for k, v in vars(est).items() if isinstance(v, (int, float))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--methods", default="lora,full")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for nproc in (1, 2):
                r = run(method, nproc, args, Path(tmp) / f"{method}-{nproc}")
                r["estimate_mb"] = estimate(method, nproc, args)
                rows.append(r)
                print(f"{method:5} x{nproc}: {r['tokens_per_s']:7.1f} tok/s, peak MB per rank {r['peak_mb_per_rank']}, "
                      f"training MB per rank {r['training_mb_per_rank']}", flush=True)
    alone, each = machine_ceiling()
    base = imports_mb()
    print(f"\nCPU: {cpu_name()}; {os.cpu_count()} cores; one thread per process; batch {args.batch_size} x "
          f"{args.max_length} tokens, {args.steps} steps, bf16")
    print(f"machine ceiling: a bf16 matmul of one single-threaded process runs at {alone:.0f} GFLOP/s alone and "
          f"{each:.0f} beside another: 2 processes can scale by {each / alone:.2f} at most; a process's imports "
          f"take {base} MB")
    print(f"{'method':6} {'strategy':8} {'procs':>5} {'tok/s':>8} {'peak MB/rank':>13} {'training MB/rank':>17} {'scaling':>8}")
    by = {(r["method"], r["processes"]): r for r in rows}
    for r in rows:
        one = by.get((r["method"], 1))
        scaling = f"{r['tokens_per_s'] / (r['processes'] * one['tokens_per_s']):.2f}" if one and r["processes"] > 1 else ""
        strategy = "-" if r["processes"] == 1 else ("ddp" if r["method"] == "lora" else "fsdp")
        print(f"{r['method']:6} {strategy:8} {r['processes']:>5} {r['tokens_per_s']:>8.1f} "
              f"{max(r['peak_mb_per_rank']):>13} {max(r['training_mb_per_rank'] or [0]):>17} {scaling:>8}")
        if r["estimate_mb"]:
            grown = max(r["training_mb_per_rank"] or [0]) - base
            print(f"{'':6} estimate per rank {r['estimate_mb']['total']} MB against {grown} MB measured above the "
                  f"imports ({r['estimate_mb']['total'] / grown:.2f}): {r['estimate_mb']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"cpu": cpu_name(), "args": vars(args), "imports_mb": base, "matmul_gflops_alone": alone, "matmul_gflops_each_of_two": each,
           "results": rows}
    tmp = RESULTS / "distributed.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, RESULTS / "distributed.json")
    print(f"\nwrote {RESULTS / 'distributed.json'}")


if __name__ == "__main__":
    main()

"""AdaLoRA against LoRA on the default SmolLM2, classification, at an equal budget of trainable
parameters in the saved adapter (LoRA rank 8 against AdaLoRA from rank 12 down to an average of 8)
and in the same time.

    .venv/bin/python benchmarks/bench_adalora.py [--minutes 4] [--epochs 3]

- the shipped sentiment set: each method for --epochs epochs;
- SST-2 (../shared/data/sst2, skipped without it): LoRA for --minutes of training; AdaLoRA then
  plans its rank schedule over the steps LoRA took and is capped by the same --minutes.
Each run is a `llamaforge finetune classify` process of its own, one after another. Prints the
best dev accuracy of each, the steps and minutes of training, and the parameters each adapter
saved; writes benchmarks/results/adalora.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SST2 = ROOT.parent / "shared" / "data" / "sst2"
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_name  # noqa: E402

METHODS = {"lora r8": ["--method", "lora", "--lora-rank", "8"],
           "adalora 12->8": ["--method", "adalora", "--init-rank", "12", "--target-rank", "8"]}


def saved_parameters(adapter_dir: Path) -> int:
    from safetensors import safe_open
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape()[1] if len(f.get_slice(k).get_shape()) > 1
                                                    else 1) for k in f.keys() if ".lora_" in k)


def run(name: str, flags: list[str], data: dict, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "llamaforge", "finetune", "classify", "--train", str(data["train"]),
               "--dev", str(data["dev"]), "--out", str(out), "--seed", "0", *data.get("columns", []), *flags, *extra]
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads((out / "metrics.json").read_text())
        best = max(metrics["evals"], key=lambda e: e["accuracy"])
        last = metrics["evals"][-1]
        row = {"method": name, "dev_accuracy": best["accuracy"], "best_step": best["step"], "steps": last["step"],
               "train_minutes": last["train_minutes"], "saved_lora_parameters": saved_parameters(out / "best")}
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    shipped = ROOT / "llamaforge" / "datasets" / "sentiment"
    results = {"cpu": cpu_name(), "shipped": [], "sst2": []}
    for name, flags in METHODS.items():
        results["shipped"].append(run(name, flags, {"train": shipped / "train.csv", "dev": shipped / "dev.csv"},
                                      ["--epochs", str(args.epochs), "--batch-size", "16"]))
    if SST2.exists():
        data = {"train": SST2 / "train.tsv", "dev": SST2 / "dev.tsv", "columns": ["--text-column", "sentence"]}
        lora = run("lora r8", METHODS["lora r8"], data, ["--max-minutes", str(args.minutes), "--eval-every", "100"])
        ada = run("adalora 12->8", METHODS["adalora 12->8"], data,
                  ["--max-minutes", str(args.minutes), "--max-steps", str(lora["steps"]), "--eval-every", "100"])
        results["sst2"] = [lora, ada]
    else:
        print(f"{SST2} not found: SST-2 skipped", file=sys.stderr)
    print(f"\nSmolLM2-135M classification, bf16 ({results['cpu']}):")
    print("| data | method | saved LoRA parameters | steps | training minutes | best dev accuracy |")
    print("|---|---|---|---|---|---|")
    for data in ("shipped", "sst2"):
        for r in results[data]:
            print(f"| {data} | {r['method']} | {r['saved_lora_parameters']:,} | {r['steps']} | {r['train_minutes']:.1f} | "
                  f"{r['dev_accuracy']:.3f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "adalora.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The origin documents' recipe, run as written, for the time-to-accuracy comparison.

    .venv/bin/python benchmarks/bench_origin_recipe.py [--minutes 12] [--eval-every 50]

transformers' LlamaForSequenceClassification on the default SmolLM2 weights, full fine-tuning in
fp32, every example padded to max_length=128, AdamW (lr 2e-5, decoupled weight decay 0.01),
batch 16, data in shuffled order, a tqdm loop; evaluation on SST-2 dev with the argmax over the
class dimension (the recipe's `argmax(dim=2)` of 2-D logits would fail). Prints dev accuracy
against training minutes (evaluation time excluded), to set beside the curve that
`llamaforge finetune classify ... --max-minutes 10` writes into its metrics.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"
MAX_LEN, BATCH = 128, 16



sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=12)
    ap.add_argument("--eval-every", type=int, default=50)
    args = ap.parse_args()
    print_machine()
    from tqdm import tqdm
    from transformers import LlamaForSequenceClassification

    from llamaforge.data.labelled import read_labelled
    from llamaforge.export import export
    from llamaforge.formats.load import load

    _, tok = load("default")
    train = read_labelled(SST2 / "train.tsv", "sentence", "label")
    dev = read_labelled(SST2 / "dev.tsv", "sentence", "label")

    def encode(examples):   # pad (right) or truncate every example to MAX_LEN, as the recipe does
        ids = [s[:MAX_LEN] + [tok.pad_id] * (MAX_LEN - len(s[:MAX_LEN])) for s in tok.encode_batch([e.text for e in examples])]
        return torch.tensor(ids), torch.tensor([int(e.label) for e in examples])

    x_train, y_train = encode(train)
    x_dev, y_dev = encode(dev)
    with tempfile.TemporaryDirectory() as d:
        hf_dir = export("default", "hf", str(Path(d) / "smollm2"))
        torch.manual_seed(0)
        model = LlamaForSequenceClassification.from_pretrained(str(hf_dir), num_labels=2, pad_token_id=tok.pad_id,
                                                               dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))

    def evaluate():
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(x_dev), 64):
                correct += (model(x_dev[i:i + 64]).logits.argmax(-1) == y_dev[i:i + 64]).sum().item()
        model.train()
        return correct / len(x_dev)

    curve, train_seconds, step = [], 0.0, 0
    model.train()
    bar = tqdm(desc="origin recipe", unit="step", file=sys.stderr)
    while train_seconds < args.minutes * 60:
        idx = order[step * BATCH:(step + 1) * BATCH]
        t = time.perf_counter()
        loss = model(x_train[idx], labels=y_train[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        train_seconds += time.perf_counter() - t
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.eval_every == 0:
            acc = evaluate()
            curve.append({"step": step, "train_minutes": round(train_seconds / 60, 2), "accuracy": acc})
            bar.write(f"step {step} ({train_seconds / 60:.1f} min): dev accuracy {acc:.4f}", file=sys.stderr)
    bar.close()
    print(json.dumps({"recipe": "origin (fp32, full, pad to 128, AdamW 2e-5, batch 16)", "curve": curve}, indent=1))


if __name__ == "__main__":
    main()

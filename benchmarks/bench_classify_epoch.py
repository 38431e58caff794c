"""One epoch of LoRA classification on real SST-2 phrases, whole commands against the peer's loop.

    .venv/bin/python benchmarks/bench_classify_epoch.py [--train-rows 2000] [--dev-rows 400] [--seeds 0]
        [--no-compile]

The setting of issue 18: the first --train-rows phrases of SST-2's training set (../shared/data),
bf16, batch 16, lr 2e-4, one epoch, LoRA r=16 alpha=32 on all seven linear layers. The peer is
transformers + peft as a user writes it: LlamaForSequenceClassification under bf16 autocast, batches
of similar length (the same index batches llamaforge makes), fused AdamW (weight decay 0.01) with
llamaforge's default schedule (5% warmup, linear decay), the gradient norm clipped to 1.0; its
loop is timed (tokenised data in, trained model out).
llamaforge runs its command line, `llamaforge finetune classify`, eager and with --compile: the
whole command's wall time (loading, training, dev evaluation, saving) and its loop's time (the
trainer's own clock, which counts a compilation). Dev accuracy on the first --dev-rows dev phrases
for each. The three run one after another in this process's run: compare ratios.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"
BATCH, LR, MAX_LEN = 16, 2e-4, 128

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_classify import LORA, hf_trainer_optimizer  # noqa: E402
from machine import print_machine  # noqa: E402


def head_tsv(src: Path, rows: int, dst: Path) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()
    dst.write_text("\n".join(lines[:rows + 1]) + "\n", encoding="utf-8")
    return dst


def peer(hf_dir: str, train: Path, dev: Path, seed: int) -> tuple[float, float]:
    """(loop seconds, dev accuracy) of transformers + peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    from llamaforge.data.batching import length_bucketed_batches, pad_right
    from llamaforge.data.labelled import encode_texts, read_labelled
    from llamaforge.formats.load import load
    _, tok = load("default")
    examples = read_labelled(train, "sentence", "label")
    seqs = encode_texts(tok, examples, MAX_LEN, report=False)   # as `finetune classify` encodes
    labels = [int(e.label) for e in examples]
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification.from_pretrained(hf_dir, num_labels=2, pad_token_id=tok.pad_id,
                                                           dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=LORA["r"], lora_alpha=LORA["alpha"],
                                             lora_dropout=0.0, target_modules=LORA["targets"]))
    model.train()
    opt = hf_trainer_optimizer(model, LR)
    # llamaforge's order for the same seed (trainer._epoch_generator(seed, 0))
    batches = length_bucketed_batches([len(s) for s in seqs], BATCH, torch.Generator().manual_seed(seed * 1_000_003))
    # llamaforge's default schedule (5% linear warmup, then linear decay: HF's
    # get_linear_schedule_with_warmup), so that the accuracies compare equal settings.
    from llamaforge.train.trainer import TrainConfig, lr_at
    schedule = TrainConfig(lr=LR)
    from tqdm import tqdm
    t = time.perf_counter()
    for step, idx in enumerate(tqdm(batches, desc="transformers + peft", file=sys.stderr)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, len(batches), schedule)
        ids, _ = pad_right([seqs[i] for i in idx], tok.pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=torch.tensor([labels[i] for i in idx])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t
    model.eval()
    dev_examples = read_labelled(dev, "sentence", "label")
    dev_seqs = encode_texts(tok, dev_examples, MAX_LEN, report=False)
    correct = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for idx in length_bucketed_batches([len(s) for s in dev_seqs], 32):
            ids, _ = pad_right([dev_seqs[i] for i in idx], tok.pad_id)
            pred = model(input_ids=ids).logits.argmax(-1)
            correct += sum(int(p) == int(dev_examples[i].label) for p, i in zip(pred.tolist(), idx, strict=True))
    return seconds, correct / len(dev_examples)


def ours(train: Path, dev: Path, out: Path, compile: bool, seed: int) -> tuple[float, float, float]:
    """(whole command seconds, loop seconds, dev accuracy) of `llamaforge finetune classify`."""
    cmd = [sys.executable, "-m", "llamaforge", "finetune", "classify", "--train", str(train), "--dev", str(dev),
           "--out", str(out), "--text-column", "sentence", "--lr", str(LR), "--batch-size", str(BATCH),
           "--eval-every", "100000", "--seed", str(seed)] + (["--compile"] if compile else [])
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    whole = time.perf_counter() - t
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["evals"][-1]
    return whole, last["train_minutes"] * 60, last["accuracy"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--dev-rows", type=int, default=400)
    ap.add_argument("--seeds", default="0", help="comma-separated: one run of each side per seed")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    print_machine()
    if not SST2.exists():
        raise SystemExit(f"needs {SST2} (../shared/data beside the checkout)")
    from llamaforge.export import export
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        train = head_tsv(SST2 / "train.tsv", args.train_rows, d / "train.tsv")
        dev = head_tsv(SST2 / "dev.tsv", args.dev_rows, d / "dev.tsv")
        hf_dir = str(export("default", "hf", str(d / "smollm2")))
        kinds = (("eager", False),) if args.no_compile else (("eager", False), ("compile", True))
        results = []
        for seed in seeds:
            peer_loop, peer_acc = peer(hf_dir, train, dev, seed)
            runs = {name: ours(train, dev, d / f"{name}-{seed}", compile, seed) for name, compile in kinds}
            results.append((seed, peer_loop, peer_acc, runs))
    print(f"\nLoRA classification, {args.train_rows} SST-2 phrases, batch {BATCH}, lr {LR}, one epoch, bf16; "
          f"dev accuracy on {args.dev_rows} phrases")
    print(f"{'seed':>4}  {'':40}{'loop s':>8}{'whole s':>9}{'loop ratio':>12}{'whole vs peer loop':>20}{'dev acc':>9}")
    for seed, peer_loop, peer_acc, runs in results:
        print(f"{seed:>4}  {'transformers + peft':40}{peer_loop:8.1f}{'':>9}{'':>12}{'':>20}{peer_acc:9.3f}")
        for name, (whole, loop, acc) in runs.items():
            label = "llamaforge finetune classify" + (" --compile" if name == "compile" else "")
            print(f"{seed:>4}  {label:40}{loop:8.1f}{whole:9.1f}{peer_loop / loop:11.2f}x{peer_loop / whole:19.2f}x"
                  f"{acc:9.3f}")


if __name__ == "__main__":
    main()

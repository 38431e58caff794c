"""One epoch of LoRA classification on real SST-2 phrases, whole commands against the peer's loop.

    .venv/bin/python benchmarks/bench_classify_epoch.py [--train-rows 2000] [--dev-rows 400] [--seeds 0]
        [--eager]

The setting of issue 18: the first --train-rows phrases of SST-2's training set (../shared/data),
bf16, batch 16, lr 2e-4, one epoch, LoRA r=16 alpha=32 on all seven linear layers. The peer is
transformers + peft as a user writes it: LlamaForSequenceClassification under bf16 autocast, batches
of similar length (the same index batches llamaforge makes), fused AdamW (weight decay 0.01) with
llamaforge's default schedule (5% warmup, linear decay), the gradient norm clipped to 1.0; its
loop is timed (tokenised data in, trained model out).
llamaforge runs its command line, `llamaforge finetune classify`, as a user types it (its default
compiles the blocks for a CPU run of 100 steps or more: 125 here) and, with --eager, also with
`--compile false`: the whole command's wall time (loading, training, dev evaluation, saving) and
its loop's time (the trainer's own clock, which counts the compilation: ~35 s the first time on a
machine, seconds once torch's cache holds it). Dev accuracy on the first --dev-rows dev phrases for
each. They run one after another in this process's run: compare ratios.
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
sys.path.insert(0, str(ROOT))
# Before torch: the commands this runs inherit the place of torch.compile's cache, as a user's
# shell gives it (torch would otherwise set /tmp's in this process's environment).
from llamaforge.files import keep_compiled_code  # noqa: E402

keep_compiled_code()
from bench_classify import LORA, hf_trainer_optimizer  # noqa: E402
from machine import print_machine  # noqa: E402


def head_tsv(src: Path, rows: int, dst: Path) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()
    dst.write_text("\n".join(lines[:rows + 1]) + "\n", encoding="utf-8")
    return dst


def peer(hf_dir: str, train: Path, dev: Path, seed: int) -> tuple[float, float, float]:
    """(loop seconds, dev accuracy, dev loss) of transformers + peft."""
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
    correct, nll = 0, 0.0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for idx in length_bucketed_batches([len(s) for s in dev_seqs], 32):
            ids, _ = pad_right([dev_seqs[i] for i in idx], tok.pad_id)
            logits = model(input_ids=ids).logits.float()
            truth = torch.tensor([int(dev_examples[i].label) for i in idx])
            correct += int((logits.argmax(-1) == truth).sum())
            nll += float(torch.nn.functional.cross_entropy(logits, truth, reduction="sum"))
    return seconds, correct / len(dev_examples), nll / len(dev_examples)


def ours(train: Path, dev: Path, out: Path, flags: list[str], seed: int) -> tuple[float, float, float, float, bool]:
    """(whole command seconds, loop seconds, dev accuracy, dev loss, whether it compiled) of
    `llamaforge finetune classify`."""
    cmd = [sys.executable, "-m", "llamaforge", "finetune", "classify", "--train", str(train), "--dev", str(dev),
           "--out", str(out), "--text-column", "sentence", "--lr", str(LR), "--batch-size", str(BATCH),
           "--eval-every", "100000", "--seed", str(seed), *flags]
    t = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if run.returncode:
        sys.stderr.write(run.stderr)
        raise SystemExit(f"{' '.join(cmd)} failed ({run.returncode})")
    whole = time.perf_counter() - t
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["evals"][-1]
    compiled = "compiling the blocks' training step" in run.stderr   # what --compile unset chose
    return whole, last["train_minutes"] * 60, last["accuracy"], last["loss"], compiled


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--dev-rows", type=int, default=400)
    ap.add_argument("--seeds", default="0", help="comma-separated: one run of each side per seed")
    ap.add_argument("--eager", action="store_true", help="also run with --compile false")
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
        kinds = (("default", []), ("eager", ["--compile", "false"])) if args.eager else (("default", []),)
        results = []
        for seed in seeds:
            peer_loop, peer_acc, peer_loss = peer(hf_dir, train, dev, seed)
            runs = {name: ours(train, dev, d / f"{name}-{seed}", flags, seed) for name, flags in kinds}
            results.append((seed, peer_loop, peer_acc, peer_loss, runs))
    print(f"\nLoRA classification, {args.train_rows} SST-2 phrases, batch {BATCH}, lr {LR}, one epoch, bf16; "
          f"dev accuracy and loss on {args.dev_rows} phrases")
    print(f"{'seed':>4}  {'':48}{'loop s':>8}{'whole s':>9}{'loop ratio':>12}{'whole vs peer loop':>20}"
          f"{'dev acc':>9}{'dev loss':>10}")
    for seed, peer_loop, peer_acc, peer_loss, runs in results:
        print(f"{seed:>4}  {'transformers + peft':48}{peer_loop:8.1f}{'':>9}{'':>12}{'':>20}{peer_acc:9.3f}{peer_loss:10.4f}")
        for name, (whole, loop, acc, loss, compiled) in runs.items():
            label = "llamaforge finetune classify" + (" --compile false" if name == "eager" else
                                                      " (compiled)" if compiled else " (eager)")
            print(f"{seed:>4}  {label:48}{loop:8.1f}{whole:9.1f}{peer_loop / loop:11.2f}x{peer_loop / whole:19.2f}x"
                  f"{acc:9.3f}{loss:10.4f}")
    # Over the seeds: each side's mean, and the paired differences (same batches, same dev
    # phrases) with their standard error, which says whether a gap is more than the seed's.
    import statistics

    def paired(name, i, scale):
        diffs = [scale * (r[4][name][i] - r[2 if i == 2 else 3]) for r in results]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        return statistics.mean(scale * r[4][name][i] for r in results), statistics.mean(diffs), se
    peer_acc = 100 * statistics.mean(r[2] for r in results)
    peer_loss = statistics.mean(r[3] for r in results)
    for name, _ in kinds:
        acc, dacc, se_acc = paired(name, 2, 100)
        loss, dloss, se_loss = paired(name, 3, 1)
        print(f"{name}: over {len(results)} seeds, dev accuracy {acc:.1f}% against the peer's {peer_acc:.1f}% (paired "
              f"difference {dacc:+.1f} points, standard error {se_acc:.1f}); dev loss {loss:.4f} against {peer_loss:.4f} "
              f"({dloss:+.4f}, standard error {se_loss:.4f}); loop ratio median "
              f"{statistics.median(r[1] / r[4][name][1] for r in results):.2f}x, whole command "
              f"{statistics.median(r[1] / r[4][name][0] for r in results):.2f}x the peer's loop")


if __name__ == "__main__":
    main()

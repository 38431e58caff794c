"""Classification fine-tuning speed: HF transformers + peft against llamaforge, same model (the
default SmolLM2 weights), same shapes, same hyperparameters, in one run.

    .venv/bin/python benchmarks/bench_classify.py [--steps 6] [--configs lora-bf16,lora-fp32,full-bf16,full-fp32]

Training: batch 8 x 128 tokens with no padding, LoRA r=16 alpha=32 on all seven linear layers
(dropout 0) or full fine-tuning, AdamW; tokens/s is the median over --steps optimiser steps after
one warm-up step. transformers computes bf16 the usual way, under torch.autocast on an fp32
model; llamaforge keeps frozen weights in bf16 and fp32 master copies of the trained ones.
Inference: batch 32 x 128, examples/s (transformers loaded in the dtype, llamaforge as `predict`
runs it, LoRA unmerged); and a whole file (SST-2 dev, when ../shared/data is beside the checkout),
transformers batching it in file order, llamaforge by length. Each measurement runs in a process of its own, so peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SST2_DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"   # real text for the file-prediction row
B, T, B_INFER = 8, 128, 32
LORA = dict(r=16, alpha=32.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
LR = {"lora": 5e-4, "full": 2e-5}


def batches(n, batch, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(100, 40000, (batch, T), generator=g), torch.randint(0, 2, (batch,), generator=g))
            for _ in range(n)]


def median_step_seconds(step, data):
    times = []
    for ids, y in data:
        t = time.perf_counter()
        step(ids, y)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])   # the first step warms up


def file_texts(path):
    from llamaforge.data import read_labelled
    return [e.text for e in read_labelled(path, "sentence", "label")]


def run_transformers(method, dtype, steps, hf_dir, infer, predict_file=None):
    import torch
    from transformers import LlamaForSequenceClassification
    from llamaforge.loader import load
    load_dtype = torch.bfloat16 if infer and dtype == "bf16" else torch.float32
    model = LlamaForSequenceClassification.from_pretrained(hf_dir, num_labels=2, pad_token_id=0, dtype=load_dtype)
    if predict_file:
        # As a user of transformers batches a file: in file order, 32 at a time, each batch padded
        # to its longest text.
        from llamaforge.data import pad_right
        _, tok = load("default")
        seqs = [s[:128] for s in tok.encode_batch(file_texts(predict_file))]
        model.config.pad_token_id = tok.pad_id
        model.eval()
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(seqs), B_INFER):
                model(pad_right(seqs[i:i + B_INFER], tok.pad_id)[0])
        return len(seqs) / (time.perf_counter() - t)
    if infer:
        model.eval()
        def fwd(ids, y):
            with torch.inference_mode():
                model(ids)
        return B_INFER / median_step_seconds(fwd, batches(steps + 1, B_INFER))
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=LORA["r"], lora_alpha=LORA["alpha"],
                                                 lora_dropout=0.0, target_modules=LORA["targets"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR[method], weight_decay=0.01)

    def step(ids, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(input_ids=ids, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return B * T / median_step_seconds(step, batches(steps + 1, B))


def run_llamaforge(method, dtype, steps, hf_dir, infer, predict_file=None):
    import torch
    from llamaforge.tasks.classify import ClassifyConfig, build_classifier, predict_proba
    from llamaforge.trainer import TrainConfig, fit
    cfg = ClassifyConfig(model="default", method=method, dtype=dtype, lora_rank=LORA["r"], lora_alpha=LORA["alpha"],
                         lora_dropout=0.0, lora_targets=LORA["targets"], lr=LR[method])
    torch.manual_seed(0)
    clf, tok = build_classifier(cfg, 2)
    if predict_file:   # as `llamaforge predict --data` runs: batches of similar length
        clf.eval()
        seqs = [s[:128] for s in tok.encode_batch(file_texts(predict_file))]
        t = time.perf_counter()
        predict_proba(clf, seqs, tok.pad_id, B_INFER)
        return len(seqs) / (time.perf_counter() - t)
    if infer:
        clf.eval()
        data = batches(steps + 1, B_INFER)
        return B_INFER / median_step_seconds(lambda ids, y: predict_proba(clf, ids.tolist(), 0, B_INFER), data)

    data, times = batches(steps + 1, B), []

    class Fixed:   # the trainer's own step, on fixed batches; the time between loss calls is one step
        def train_batches(self, epoch, g):
            return list(range(len(data)))
        def loss(self, model, i):
            times.append(time.perf_counter())
            ids, y = data[i]
            return torch.nn.functional.cross_entropy(model(ids), y), ids.numel()
        def evaluate(self, model):
            return {"accuracy": 0.0}
        def save_model(self, model, out):
            pass
    with tempfile.TemporaryDirectory() as d:
        fit(clf, Fixed(), TrainConfig(max_steps=len(data) + 1, batch_size=B, lr=LR[method], save_every=10_000), d)
    return B * T / statistics.median([b - a for a, b in zip(times[1:], times[2:])])


def child(args):
    fn = run_transformers if args.impl == "transformers" else run_llamaforge
    value = fn(args.method, args.dtype, args.steps, args.hf_dir, args.infer, args.predict_file)
    print(json.dumps({"value": value, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(impl, method, dtype, steps, hf_dir, infer=False, predict_file=None):
    cmd = [sys.executable, __file__, "--child", impl, "--method", method, "--dtype", dtype, "--steps", str(steps),
           "--hf-dir", hf_dir] + (["--infer"] if infer else []) + (["--predict-file", predict_file] if predict_file else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"{impl} {method} {dtype} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--configs", default="lora-bf16,lora-fp32,full-bf16,full-fp32,infer-bf16,infer-fp32")
    ap.add_argument("--child", default=None)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--hf-dir", default=None)
    ap.add_argument("--infer", action="store_true")
    ap.add_argument("--predict-file", default=None)
    args = ap.parse_args()
    if args.child:
        args.impl = args.child
        return child(args)
    with tempfile.TemporaryDirectory() as d:
        # transformers reads the same SmolLM2 weights from an HF directory (loading the GGUF
        # itself takes it ~17 s of metadata parsing per process).
        from llamaforge.export import export
        hf_dir = str(export("default", "hf", str(Path(d) / "smollm2")))
        print(f"{'config':<11} {'unit':<11} {'transformers':>12} {'llamaforge':>11} {'ratio':>6}   peak RSS MB (hf / ours)")
        for config in args.configs.split(","):
            kind, dtype = config.split("-")
            infer = kind == "infer"
            method = "lora" if infer else kind
            hf = measure("transformers", method, dtype, args.steps, hf_dir, infer)
            ours = measure("llamaforge", method, dtype, args.steps, hf_dir, infer)
            unit = "examples/s" if infer else "tokens/s"
            print(f"{config:<11} {unit:<11} {hf['value']:12.1f} {ours['value']:11.1f} {ours['value'] / hf['value']:5.2f}x"
                  f"   {hf['peak_rss_mb']:.0f} / {ours['peak_rss_mb']:.0f}", flush=True)
        if SST2_DEV.exists():
            for dtype in ("bf16", "fp32"):
                hf = measure("transformers", "lora", dtype, 0, hf_dir, True, str(SST2_DEV))
                ours = measure("llamaforge", "lora", dtype, 0, hf_dir, True, str(SST2_DEV))
                print(f"{'file-' + dtype:<11} {'examples/s':<11} {hf['value']:12.1f} {ours['value']:11.1f} "
                      f"{ours['value'] / hf['value']:5.2f}x   {hf['peak_rss_mb']:.0f} / {ours['peak_rss_mb']:.0f}"
                      f"   (SST-2 dev, {SST2_DEV})", flush=True)


if __name__ == "__main__":
    main()

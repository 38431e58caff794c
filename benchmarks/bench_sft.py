"""Generative training speed: HF transformers + peft against llamaforge, same model, same batches,
same hyperparameters, in one run.

    .venv/bin/python benchmarks/bench_sft.py [--rounds 3] [--floor] [--configs sft-lora-fp32,sft-lora-bf16,...]

sft-*       the default SmolLM2 on the shipped instruction set (llamaforge/datasets/instructions),
            batches of 8 conversations of similar length padded to the longest (at most 128
            tokens), loss on the assistant tokens only; LoRA r=16 alpha=32 on all seven linear
            layers (dropout 0), or full fine-tuning; AdamW (fused, as HF's Trainer's default, with
            the gradient norm clipped to 1.0 on both sides).
shape-*     the shape the issue quotes: SmolLM2, batch 8 x 128 tokens, every token scored.
pretrain-*  a new `mini` Llama (3.4M parameters, random init) on the shipped stories, batch 16 x 256.

transformers computes bf16 the usual way, under torch.autocast on an fp32 model, and its loss
takes logits at every position; llamaforge keeps frozen weights in bf16 with fp32 master copies of
the trained ones, computes logits only where a token is scored, and steps through its own trainer
(`trainer.fit`); a third column trains as `--compile` does (the blocks through torch.compile,
compiled in the warm-up round). Figures are real (non-padding) tokens per second, the median step
of blocks the implementations take in turn, round after round, so that drift of this machine hits
all alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_classify  # noqa: E402
from bench_classify import LORA, hf_trainer_optimizer, hf_trainer_step, trainer_step_times
from products_floor import FLOOR_HEADER, FLOOR_HELP, ProductsAlone, floor_columns  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ROOT / "llamaforge" / "datasets"
BLOCK = 3
LR = {"lora": 2e-4, "full": 2e-5, "pretrain": 2e-3}



sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402


def sft_batches(tok, n_blocks: int):
    """Blocks of (ids, labels, real tokens) from the instruction set, batches of similar length."""
    from llamaforge.data.batching import length_bucketed_batches, pad_labelled
    from llamaforge.data.conversations import encode_examples, read_examples
    pairs = encode_examples(tok, read_examples(DATASETS / "instructions" / "train.jsonl"), 128, 8192)
    order = length_bucketed_batches([len(p[0]) for p in pairs], 8, torch.Generator().manual_seed(0))
    out = []
    for idx in order:
        ids, labels = pad_labelled([pairs[i] for i in idx], tok.pad_id)
        out.append((ids, labels, sum(len(pairs[i][0]) for i in idx)))
    return [out[i * BLOCK:(i + 1) * BLOCK] for i in range(n_blocks)]


def shape_batches(n_blocks: int, B=8, T=128, vocab=49152):
    g = torch.Generator().manual_seed(0)
    blocks = []
    for _ in range(n_blocks):
        blocks.append([(ids, ids, ids.numel()) for ids in (torch.randint(100, vocab, (B, T), generator=g) for _ in range(BLOCK))])
    return blocks


def pretrain_batches(tok, n_blocks: int, B=16, T=256):
    import numpy as np

    from llamaforge.data.corpus import corpus_files
    from llamaforge.train.pretrain import token_file
    tokens = token_file(corpus_files(DATASETS / "stories" / "corpus.txt"), tok, "stories")
    g = torch.Generator().manual_seed(0)
    blocks = []
    for _ in range(n_blocks):
        block = []
        for _ in range(BLOCK):
            starts = torch.randint(0, len(tokens) - T, (B,), generator=g).tolist()
            ids = torch.stack([torch.from_numpy(np.asarray(tokens[s:s + T], dtype=np.int64)) for s in starts])
            block.append((ids, ids, ids.numel()))
        blocks.append(block)
    return blocks


class Transformers:
    def __init__(self, kind, method, dtype, source):
        from transformers import LlamaForCausalLM
        if kind == "pretrain":
            from transformers import LlamaConfig as HFConfig

            from llamaforge.formats.hf import config_to_hf
            torch.manual_seed(0)
            self.model = LlamaForCausalLM(HFConfig(**config_to_hf(source)))
        else:
            self.model = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32)
        self.model.to(bench_classify.DEVICE)
        if method == "lora":
            from peft import LoraConfig, get_peft_model
            self.model = get_peft_model(self.model, LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                                               lora_dropout=0.0, target_modules=LORA["targets"]))
        self.model.train()
        self.dtype = dtype
        self.opt = hf_trainer_optimizer(self.model, LR[method])

    def block(self, data):
        times = []
        for ids, labels, _ in data:
            t = time.perf_counter()
            hf_trainer_step(self.model, self.opt, self.dtype, input_ids=ids, labels=labels)
            times.append(time.perf_counter() - t)
        return times


class Llamaforge:
    def __init__(self, kind, method, dtype, source, compile=False):
        from llamaforge.formats.load import load, parse_dtype
        from llamaforge.model.adapters import LoRAConfig, add_lora
        torch.manual_seed(0)
        if kind == "pretrain":
            from llamaforge.model.llama import Llama
            from llamaforge.train.pretrain import init_weights
            self.model = Llama(source)
            init_weights(self.model)
            self.model.to(parse_dtype(dtype))
            self.model.to(bench_classify.DEVICE)
        else:
            self.model, _ = load("default", dtype=dtype, device=bench_classify.DEVICE)
            if method == "lora":
                add_lora(self.model, LoRAConfig(rank=LORA["r"], alpha=LORA["alpha"], dropout=0.0, targets=LORA["targets"]))
            else:
                self.model.requires_grad_(True)
        self.method, self.compile = method, compile

    def block(self, data):
        from llamaforge.evaluate.lm import next_token_loss
        return trainer_step_times(self.model, data, lambda m, d: (next_token_loss(m, d[0], d[1])[0], d[2]),
                                  LR[self.method], self.compile)


def products_alone(kind, method, dtype, source):
    """--floor: the matrix products of llamaforge's step on each batch, alone (products_floor.py);
    batches share a recording where their shape and their scored tokens (the output projection's
    rows) are equal."""
    from llamaforge.data.conversations import IGNORE
    from llamaforge.evaluate.lm import next_token_loss
    model = Llamaforge(kind, method, dtype, source).model
    return ProductsAlone(lambda d: lambda: next_token_loss(model, d[0], d[1])[0].backward(),
                         key=lambda d: (tuple(d[0].shape), int((d[1][:, 1:] != IGNORE).sum())))


def speed(kind, method, dtype, source, blocks, floor=False):
    impls = {"transformers": Transformers(kind, method, dtype, source), "llamaforge": Llamaforge(kind, method, dtype, source),
             "compiled": Llamaforge(kind, method, dtype, source, compile=True)}
    if floor:
        impls["products alone"] = products_alone(kind, method, dtype, source)
    times = {name: [] for name in impls}
    for r, block in enumerate(blocks):
        for name, impl in impls.items():
            t = impl.block(block)
            if r:   # the first round warms up
                # tokens per second of each step: that batch's real tokens over its time
                times[name] += [b[2] / s for b, s in zip(block, t, strict=True)]
    return {name: statistics.median(v) for name, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default="sft-lora-fp32,sft-lora-bf16,sft-full-bf16,sft-full-fp32,"
                                         "shape-lora-fp32,shape-lora-bf16,pretrain-full-bf16,pretrain-full-fp32")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where both implementations run")
    ap.add_argument("--floor", action="store_true", help=FLOOR_HELP)
    args = ap.parse_args()
    print_machine()
    bench_classify.DEVICE = args.device
    from llamaforge.export import export
    from llamaforge.formats.load import load
    from llamaforge.model.config import PRESETS
    from llamaforge.text.convert import from_hf_dir
    _, smol_tok = load("default")
    with tempfile.TemporaryDirectory() as d:
        hf_dir = str(export("default", "hf", str(Path(d) / "smollm2")))
        print(f"{'config':<20} {'transformers':>12} {'llamaforge':>11} {'ratio':>6} {'--compile':>10} {'ratio':>6}"
              f"   (real tokens/s, median step)"
              + (FLOOR_HEADER if args.floor else ""))
        for config in args.configs.split(","):
            kind, method, dtype = config.split("-")
            n = args.rounds + 1
            if kind == "sft":
                source, blocks = hf_dir, sft_batches(smol_tok, n)
            elif kind == "shape":
                source, blocks = hf_dir, shape_batches(n)
            else:
                tok_dir = Path(d) / "stories-tok"
                if not tok_dir.exists():
                    from llamaforge.data.corpus import corpus_files, documents
                    from llamaforge.text.training import save_trained_tokenizer, train_tokenizer
                    save_trained_tokenizer(train_tokenizer(documents(corpus_files(DATASETS / "stories")), 2048), tok_dir)
                source, blocks = PRESETS["mini"], pretrain_batches(from_hf_dir(tok_dir), n)
            v = speed(kind, method, dtype, source, blocks, args.floor)
            floor = floor_columns(v["transformers"], v["llamaforge"], v["compiled"], v.get("products alone"))
            print(f"{config:<20} {v['transformers']:12.0f} {v['llamaforge']:11.0f} "
                  f"{v['llamaforge'] / v['transformers']:5.2f}x {v['compiled']:10.0f} "
                  f"{v['compiled'] / v['transformers']:5.2f}x{floor}", flush=True)


if __name__ == "__main__":
    main()

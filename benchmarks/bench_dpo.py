"""DPO training speed: llamaforge's `finetune dpo` against TRL's DPOTrainer + peft, in one process,
on the default SmolLM2 and the shipped preference pairs, LoRA, bf16.

    .venv/bin/python benchmarks/bench_dpo.py [--steps 20] [--rounds 2]

Both sides train the same thing: LoRA r16 (alpha 32, no dropout) on every linear layer, the same
initial adapter (llamaforge's A copied into PEFT's; B starts at zero in both), the reference model
the base with the adapter switched off, sigmoid loss, beta 0.1, batch 8, AdamW lr 5e-4 constant
(no warmup, no weight decay), gradients clipped to 1.0, and the same pairs in the same batches
(llamaforge's length-bucketed batches, handed to TRL in that order). bf16 as each is used: TRL
under bf16 autocast on fp32 weights (HF Trainer's `bf16=True`), llamaforge with bf16 weights and
fp32 master copies of the adapter. Tokens: every sequence's tokens (prompt + chosen, prompt +
rejected) over the seconds of the training steps (llamaforge: the trainer's own clock; TRL: step
begin to step end, by a callback). The sides take turns, --rounds times; the ratio of medians is
printed with the loss of each of the first steps (and of each block of 10), which must agree.

Writes benchmarks/results/dpo.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAIRS = ROOT / "llamaforge" / "datasets" / "preferences"
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_name  # noqa: E402

SETTINGS = dict(batch_size=8, lr=5e-4, schedule="constant", warmup=0, weight_decay=0.0, max_grad_norm=1.0,
                lora_rank=16, lora_alpha=32.0, lora_dropout=0.0, beta=0.1, loss="sigmoid", seed=0)


def config(out: Path, steps: int):
    from llamaforge.train.dpo import DPOConfig
    return DPOConfig(train=str(PAIRS / "train.jsonl"), dev=str(PAIRS / "dev.jsonl"), out=str(out), max_steps=steps,
                     eval_every=0, log_every=1, **SETTINGS)


def our_plan(steps: int):
    """(the pairs of each of the first `steps` batches, in order, as finetune dpo will take them;
    the initial LoRA A of every module, by PEFT's module name; tokens of each batch)."""
    from llamaforge.data.preferences import encode_pair, read_pairs
    from llamaforge.train.dpo import PreferenceTask
    from llamaforge.train.sft import build_model_and_length
    from llamaforge.train.trainer import _epoch_generator
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(Path(tmp) / "plan", steps)
        model, tok = build_model_and_length(cfg)   # seeded as the run will be: the same initial adapter
        pairs = read_pairs(cfg.train)
        encoded = [encode_pair(tok, p, cfg.max_length) for p in pairs]
        task = PreferenceTask(cfg, encoded, [], tok, None)
        batches = task.train_batches(0, _epoch_generator(cfg.seed, 0))[:steps]
    lora_a = {f"base_model.model.model.{n.removesuffix('.lora_A')}.lora_A.default.weight": p.detach().float().clone()
              for n, p in model.named_parameters() if n.endswith(".lora_A")}
    tokens = [sum(2 * len(encoded[i][0]) + len(encoded[i][1]) + len(encoded[i][2]) for i in b) for b in batches]
    return batches, lora_a, tokens


def run_ours(steps: int) -> dict:
    from llamaforge.train.dpo import finetune_dpo
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        finetune_dpo(config(out, steps))
        metrics = json.loads((out / "metrics.json").read_text())
    return {"seconds": metrics["evals"][-1]["train_minutes"] * 60, "losses": [r["loss"] for r in metrics["train"]]}


def run_trl(steps: int, batches, lora_a, hf_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from llamaforge.model.adapters import ALL_LINEARS
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = get_peft_model(model, LoraConfig(r=SETTINGS["lora_rank"], lora_alpha=SETTINGS["lora_alpha"],
                                             lora_dropout=0.0, target_modules=list(ALL_LINEARS), task_type="CAUSAL_LM"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, a in lora_a.items():
            params[name].copy_(a)
    rows = [json.loads(line) for line in (PAIRS / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    ordered = Dataset.from_list([rows[i] for b in batches for i in b])

    starts = [sum(len(b) for b in batches[:i]) for i in range(len(batches))]
    spans = [list(range(s, s + len(b))) for s, b in zip(starts, batches, strict=True)]

    class InOrder(DPOTrainer):   # llamaforge's batches, as they are (a length bucket's last may be short)
        def get_train_dataloader(self):
            ds = self._remove_unused_columns(self.train_dataset, description="Training")
            return self.accelerator.prepare(DataLoader(ds, batch_sampler=spans, collate_fn=self.data_collator))

    clock = {"begin": 0.0, "total": 0.0}

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            clock["total"] += time.perf_counter() - clock["begin"]

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=SETTINGS["batch_size"], max_steps=steps,
                         learning_rate=SETTINGS["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=1.0, beta=SETTINGS["beta"], loss_type=[SETTINGS["loss"]], bf16=True, use_cpu=True,
                         logging_steps=1, report_to=[], save_strategy="no", max_length=None, seed=0,
                         dataloader_drop_last=False)
        trainer = InOrder(model=model, args=args, train_dataset=ordered, processing_class=tok, callbacks=[StepClock()])
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"seconds": clock["total"], "losses": losses}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(torch.get_num_threads())
    batches, lora_a, tokens = our_plan(args.steps)
    n_tokens = sum(tokens)
    runs = {"llamaforge": [], "trl": []}
    from llamaforge.export import export
    with tempfile.TemporaryDirectory() as d:
        # transformers would not train the GGUF file it loads (it counts as quantised): the same
        # weights as an HF directory, with the tokenizer and chat template.
        hf_dir = str(export("default", "hf", str(Path(d) / "smollm2")))
        for r in range(args.rounds):
            runs["llamaforge"].append(run_ours(args.steps))
            runs["trl"].append(run_trl(args.steps, batches, lora_a, hf_dir))
            print(f"round {r + 1}: llamaforge {n_tokens / runs['llamaforge'][-1]['seconds']:.0f} tokens/s, "
                  f"TRL {n_tokens / runs['trl'][-1]['seconds']:.0f} tokens/s", flush=True)
    rate = {k: statistics.median(n_tokens / v["seconds"] for v in runs[k]) for k in runs}
    print(f"\nDPO, SmolLM2-135M, LoRA r16, bf16, {args.steps} steps of 8 pairs ({n_tokens:,} tokens), "
          f"{cpu_name()}:")
    def first(losses, n=6):
        return ", ".join(f"{x:.4f}" for x in losses[:n])

    def blocks(losses):
        return ", ".join(f"{statistics.mean(losses[i:i + 10]):.4f}" for i in range(0, len(losses), 10))
    for name, label in (("trl", "TRL + peft"), ("llamaforge", "llamaforge")):
        losses = runs[name][0]["losses"]
        print(f"  {label:<12} {rate[name]:.0f} tokens/s   losses of the first steps {first(losses)}   "
              f"mean per 10 steps {blocks(losses)}")
    print(f"  ratio {rate['llamaforge'] / rate['trl']:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dpo.json").write_text(json.dumps({"cpu": cpu_name(), "steps": args.steps, "tokens": n_tokens,
                                                   "tokens_per_second": rate, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()

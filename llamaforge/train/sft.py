"""Instruction / chat fine-tuning (SFT): the next-token loss on the assistant's tokens only, with
full, LoRA or prefix-tuning, padded batches of similar length or packed rows. The loop is
`trainer.fit`; data shapes are in `data/conversations.py`.

Run directory:
    config.yaml          the resolved config
    metrics.json         each dev evaluation (loss, perplexity), then the final one of the best model
    samples.log          greedy replies to a few dev prompts at each evaluation
    best/                LoRA: PEFT adapter (adapter_config.json + adapter_model.safetensors);
                         prefix: prefix_config.json + prefix.safetensors;
                         full: an HF LlamaForCausalLM directory with tokenizer and chat template
    checkpoint/ (resumable, see train/checkpoint.py), tensorboard/, curves.png
The run directory is a model: `llamaforge chat --model RUN` talks to its best model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.batching import length_bucketed_batches, pack_rows, packed_batch, pad_labelled
from ..data.conversations import FORMATS, IGNORE, Example, encode_examples, read_examples
from ..errors import LlamaforgeError
from ..evaluate.lm import mean_loss, next_token_loss
from ..evaluate.tasks import GENERATION_TASKS, read_task, training_examples
from ..formats import hf
from ..formats.load import load
from ..model.adapters import add_prefix, refuse_prefix, save_peft_adapter, save_prefix
from ..model.generation import SamplingConfig, generate_from_ids
from ..provenance.modelcard import check_licence, write_run_cards
from .base import LORA_METHODS, FinetuneConfig, base_model_reference, open_run, write_new_run
from .distributed import init_world
from .trainer import fit, write_metrics

PREFIX_INIT_TEXT = "You are a helpful assistant. Read the request carefully and answer it well."


@dataclass
class SFTConfig(FinetuneConfig):
    format: str = "auto"                  # auto | chat | alpaca | completion
    task: str | None = None               # qa | translate | summarize: a task file turned into prompts
    target_lang: str | None = None        # translate: the language to translate into (default: the data's)
    source_lang: str | None = None
    pack: bool = False                    # pack examples into rows of max_length tokens
    prefix_length: int = 16               # prefix-tuning: virtual tokens per layer
    dev_fraction: float = 0.05            # without --dev, hold out this share of --train
    samples: int = 3                      # dev prompts answered (greedily) at each evaluation
    sample_tokens: int = 64
    batch_size: int = 8
    max_length: int | None = None         # None: 512, or the model's context if shorter
    eval_batch_size: int = 16
    metric: str = "loss"
    greater_is_better: bool = False

    # Measured: README, generative figures; AdaLoRA 10x LoRA's, as for classification (FinetuneConfig).
    DEFAULT_LR = {"lora": 1e-3, "adalora": 1e-2, "full": 2e-5, "prefix": 2e-2}

    def __post_init__(self):
        if self.format not in FORMATS:
            raise LlamaforgeError(f"format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.task not in (None, *GENERATION_TASKS):
            raise LlamaforgeError(f"task must be one of {', '.join(GENERATION_TASKS)}, not {self.task!r}")
        if not 0 < self.dev_fraction < 1:
            raise LlamaforgeError(f"dev-fraction must be between 0 and 1, got {self.dev_fraction}")
        super().__post_init__()


def read_split(path, cfg: SFTConfig) -> list[Example]:
    if cfg.task:   # a task file, with the prompts that `evaluate --task` scores
        return training_examples(read_task(path, cfg.task, target_lang=cfg.target_lang, source_lang=cfg.source_lang))
    return read_examples(path, cfg.format)


def hold_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, dev): a seeded random `fraction` (at least one example) held out for dev."""
    if len(examples) < 2:
        raise LlamaforgeError("need at least two examples to hold one out for dev (or give --dev)")
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_dev = max(1, round(len(examples) * fraction))
    dev = set(perm[:n_dev])
    return [e for i, e in enumerate(examples) if i not in dev], [examples[i] for i in sorted(dev)]


def prompt_of(tok, ex: Example) -> tuple[list[int], str]:
    """(prompt ids, reference reply) for a sample generation: the conversation up to its last
    assistant turn, or the completion example's prompt."""
    if ex.messages is None:
        return tok.encode(ex.prompt), ex.completion
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    text = tok.apply_chat_template(ex.messages[:last], add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False), ex.messages[last]["content"]


# --- model -------------------------------------------------------------------------------------

def build_model(cfg: SFTConfig, model: str | None = None):
    """(Llama with the method's trainable parameters, tokenizer) from the base model."""
    llama, tok = load(model or cfg.model, dtype=cfg.dtype)
    if cfg.method in LORA_METHODS:
        cfg.add_adapters(llama)
    elif cfg.method == "prefix":
        add_prefix(llama, cfg.prefix_length, tok.encode(PREFIX_INIT_TEXT, add_special_tokens=False))
    else:
        refuse_prefix(llama, model or cfg.model)
        llama.requires_grad_(True)
    return llama, tok


def build_model_and_length(cfg):
    """build_model, seeded (the new parameters start the same every run), with cfg.max_length
    resolved: 512, or the model's context if shorter."""
    torch.manual_seed(cfg.seed)
    llama, tok = build_model(cfg)
    context = llama.config.max_seq_len
    cfg.max_length = cfg.max_length or min(512, context)
    if cfg.max_length > context:
        raise LlamaforgeError(f"max-length {cfg.max_length} exceeds the model's context of {context}")
    return llama, tok


def save_model(llama, out_dir: Path, cfg: SFTConfig, tok):
    base = base_model_reference(cfg.model)
    if cfg.method in LORA_METHODS:
        save_peft_adapter(llama, out_dir, cfg.lora(), "CAUSAL_LM", base_model=base, hf_prefix="model.")
    elif cfg.method == "prefix":
        save_prefix(llama, out_dir, base_model=base)
    else:
        hf.write_model(llama, tok, out_dir)


# --- the task for trainer.fit -------------------------------------------------------------------

class CausalLMTask:
    """Encoded (ids, labels) pairs: padded batches of similar length, or packed rows."""

    def __init__(self, cfg: SFTConfig, train, dev, tok, out: Path, samples: list[tuple[list[int], str]] = ()):
        self.cfg, self.train, self.dev, self.tok, self.out = cfg, train, dev, tok, out
        self.lengths = [len(ids) for ids, _ in train]
        # Tokens each example's loss scores (the first label is never predicted).
        self.scored = [sum(label != IGNORE for label in labels[1:]) for _, labels in train]
        self.samples = list(samples)
        self.last_samples = ""

    def train_batches(self, epoch, generator):
        if self.cfg.pack:
            rows = pack_rows(self.lengths, self.cfg.max_length, generator)
            return [rows[i:i + self.cfg.batch_size] for i in range(0, len(rows), self.cfg.batch_size)]
        return length_bucketed_batches(self.lengths, self.cfg.batch_size, generator)

    def loss(self, model, batch):
        if self.cfg.pack:
            ids, labels, pos, mask = packed_batch(self.train, batch, self.tok.pad_id)
            real = sum(self.lengths[i] for row in batch for i in row)
        else:
            ids, labels = pad_labelled([self.train[i] for i in batch], self.tok.pad_id)
            pos = mask = None
            real = sum(self.lengths[i] for i in batch)
        loss, _ = next_token_loss(model, ids, labels, pos, mask, reduction="sum")
        return loss, real

    def units(self, batch):
        examples = [i for row in batch for i in row] if self.cfg.pack else batch
        return sum(self.scored[i] for i in examples)

    def evaluate(self, model, world):
        loss, n = mean_loss(model, self.dev, self.tok.pad_id, self.cfg.eval_batch_size, world=world)
        metrics = {"loss": loss, "perplexity": math.exp(loss), "tokens": n}
        self.last_samples = self.generate_samples(model) if world.main else ""
        if self.last_samples:
            with open(self.out / "samples.log", "a", encoding="utf-8") as f:
                f.write(f"=== dev loss {loss:.4f}\n{self.last_samples}\n")
        return metrics

    def generate_samples(self, model) -> str:
        if not self.samples:
            return ""
        cfg = SamplingConfig(max_new_tokens=self.cfg.sample_tokens, temperature=0)
        lines = []
        for ids, reference in self.samples:
            reply = generate_from_ids(model, self.tok, [ids], cfg)[0]
            prompt = self.tok.decode(ids, skip_special_tokens=True).strip().replace("\n", " ")
            lines += [f"--- prompt: {prompt[-200:]}", f"    reply:     {reply.strip()}",
                      f"    reference: {reference.strip()[:300]}"]
        model.clear_cache()   # the KV cache is for generation only; training must not carry it
        return "\n".join(lines)

    def format_metrics(self, metrics):
        return f"dev perplexity {metrics['perplexity']:.3f}\n{self.last_samples}".rstrip()

    def save_model(self, model, out_dir):
        save_model(model, out_dir, self.cfg, self.tok)


# --- the command ---------------------------------------------------------------------------------

def finetune_sft(cfg: SFTConfig, resume: bool = False) -> dict:
    """Train, keep the best model by dev loss; returns the saved best model's dev metrics (under
    torchrun: on rank 0; the other ranks return None)."""
    world = init_world(cfg.device)
    cfg, out = open_run(cfg, resume)
    train = read_split(cfg.train, cfg)
    if cfg.dev:
        dev = read_split(cfg.dev, cfg)
    else:
        train, dev = hold_out(train, cfg.dev_fraction, cfg.seed)
        world.log(f"llamaforge: no --dev: holding out {len(dev)} of {len(train) + len(dev)} training examples "
                  f"for evaluation")

    llama, tok = build_model_and_length(cfg)
    context = llama.config.max_seq_len
    enc_train = encode_examples(tok, train, cfg.max_length, context, name=str(cfg.train))
    enc_dev = encode_examples(tok, dev, cfg.max_length, context, name=str(cfg.dev or cfg.train))
    samples = [prompt_of(tok, ex) for ex in dev[:cfg.samples]]
    samples = [(ids, ref) for ids, ref in samples if len(ids) + cfg.sample_tokens <= context]
    write_new_run(cfg, out, resume, world)
    n_trainable = sum(p.numel() for p in llama.parameters() if p.requires_grad)
    n_tokens = sum(len(ids) for ids, _ in enc_train)
    world.log(f"llamaforge: {len(enc_train)} train examples ({n_tokens:,} tokens) / {len(enc_dev)} dev; method "
              f"{cfg.method}, {n_trainable:,} trainable parameters, {cfg.dtype}" + (", packed" if cfg.pack else ""))

    terms = check_licence(cfg.model, out) if world.main else None
    task = CausalLMTask(cfg, enc_train, enc_dev, tok, out, samples)
    history = fit(llama, task, cfg, out, resume=resume, world=world)
    if not world.main:
        return None

    # The final figure comes from the best model as saved, read back as `llamaforge` reads a run.
    del llama
    best, tok = load(out, dtype=cfg.dtype)
    loss, n = mean_loss(best, encode_examples(tok, dev, cfg.max_length, context, name="dev"), tok.pad_id,
                        cfg.eval_batch_size)
    final = {"dev": {"loss": loss, "perplexity": math.exp(loss), "tokens": n, "best_step": history["state"]["best_step"]}}
    write_metrics(out, history, final)
    write_run_cards(out, "sft", cfg, [cfg.train, cfg.dev], final, ["text-generation", "conversational"], terms)
    return final

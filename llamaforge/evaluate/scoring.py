"""`llamaforge evaluate MODEL --task ...`: score a language model (base or fine-tuned) on a data file.

    perplexity  plain text, sliding window                        -> perplexity, loss, n (tokens)
    sft         chat / alpaca / completion file, answer tokens    -> perplexity, loss, n (tokens)
    qa          SQuAD JSON (or JSONL of context/question/answers) -> exact_match, f1, n
    translate   TSV of source<TAB>target, or two aligned files    -> bleu, chrf (sacrebleu), n
    summarize   JSONL of document/summary                         -> rouge1, rouge2, rougeL, n
    preference  JSONL of prompt/chosen/rejected pairs             -> accuracy, margin, n (and for a
                DPO run, reward_accuracy and reward_margin: its implicit reward against its base)

A classifier run is scored by `train.classify.evaluate_classifier`.
"""
from __future__ import annotations

import json
import math
import sys

from ..data.batching import length_bucketed_batches
from ..data.conversations import encode_examples, read_examples
from ..data.preferences import encode_pair, read_pairs
from ..errors import LlamaforgeError
from ..files import atomic_write_text, read_text
from ..formats.load import load
from ..model.generation import SamplingConfig, generate_from_ids
from .lm import mean_loss, perplexity, preference_scores
from .tasks import GENERATION_TASKS, TASKS, TaskItem, read_task


def answer(model, tok, items: list[TaskItem], max_new_tokens: int, batch_size: int = 8,
           progress: bool = False) -> list[str]:
    """Greedy answers to the items' prompts, in order; batches of similar prompt length."""
    from tqdm import tqdm
    prompts = [tok.encode(tok.apply_chat_template(it.messages), add_special_tokens=False) for it in items]
    limit = model.config.max_seq_len - max_new_tokens
    for it, p in zip(items, prompts, strict=True):
        if len(p) > limit:
            raise LlamaforgeError(f"{it.source}: the prompt has {len(p)} tokens; with {max_new_tokens} new tokens "
                                  f"that exceeds the model's context of {model.config.max_seq_len}")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0)
    out = [""] * len(items)
    for idx in tqdm(length_bucketed_batches([len(p) for p in prompts], batch_size), desc="generate", unit="batch",
                    file=sys.stderr, disable=not progress, dynamic_ncols=True):
        for i, text in zip(idx, generate_from_ids(model, tok, [prompts[i] for i in idx], cfg), strict=True):
            out[i] = text.strip()
    model.clear_cache()
    return out


def evaluate_model(model: str, task: str, data, fmt: str = "auto", target: str | None = None,
                   target_lang: str | None = None, source_lang: str | None = None, dtype: str = "bf16",
                   batch_size: int = 8, window: int | None = None, max_new_tokens: int | None = None,
                   limit: int | None = None, predictions_out: str | None = None, device: str = "auto") -> dict:
    """The task's metrics for a model or run directory on a data file."""
    if task not in TASKS:
        raise LlamaforgeError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise LlamaforgeError(f"--limit must be at least 1, got {limit}")
    # The data first: a missing file or a bad row is reported before a model loads.
    if task == "perplexity":
        text = read_text(data)
    elif task == "sft":
        examples = read_examples(data, fmt)[:limit]
    elif task == "preference":
        pairs = read_pairs(data)[:limit]
    else:
        items = read_task(data, task, target, target_lang, source_lang)[:limit]
    net, tok = load(model, dtype=dtype, device=device)
    if task == "perplexity":
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) < 2:
            raise LlamaforgeError(f"{data}: too little text to score (needs at least 2 tokens)")
        window = window or min(net.config.max_seq_len, 1024)
        if not 2 <= window <= net.config.max_seq_len:
            raise LlamaforgeError(f"--window must be between 2 and the model's context ({net.config.max_seq_len}), got {window}")
        return perplexity(net, ids, window, batch_size=batch_size, progress=True)
    if task == "preference":
        encoded = [encode_pair(tok, p, net.config.max_seq_len) for p in pairs]
        base, beta = dpo_base(model)
        reference = load(base, dtype=dtype, device=device)[0] if base else None
        return preference_scores(net, encoded, tok.pad_id, batch_size, reference, beta)
    if task == "sft":
        pairs = encode_examples(tok, examples, net.config.max_seq_len, net.config.max_seq_len, name=str(data))
        loss, n = mean_loss(net, pairs, tok.pad_id, batch_size, progress=True)
        return {"perplexity": math.exp(loss), "loss": loss, "n": n}
    predictions = answer(net, tok, items, max_new_tokens or GENERATION_TASKS[task].max_new_tokens, batch_size, progress=True)
    if predictions_out:
        atomic_write_text(predictions_out, "".join(json.dumps({"source": it.source, "prediction": p, "references": it.references},
                                                              ensure_ascii=False) + "\n" for it, p in zip(items, predictions, strict=True)))
    return GENERATION_TASKS[task].score(predictions, [it.references for it in items])


def format_scores(scores: dict) -> str:
    return "\n".join(f"{k:>12}  {v:.4f}" if isinstance(v, float) else f"{k:>12}  {v}" for k, v in scores.items())


def dpo_base(model: str) -> tuple[str | None, float]:
    """(base model, beta) of a DPO run directory; (None, 0) for anything else."""
    from pathlib import Path

    from ..files import read_yaml
    config = Path(model) / "config.yaml"
    if model == "default" or not config.is_file():
        return None, 0.0
    values = read_yaml(config)
    if values.get("loss") not in ("sigmoid", "ipo", "simpo") or "beta" not in values:
        return None, 0.0
    return values.get("model") or "default", float(values["beta"])

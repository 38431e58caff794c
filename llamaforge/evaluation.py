"""`llamaforge evaluate MODEL_OR_RUN --task ...`: score a language model (base or fine-tuned).

    perplexity  plain text, sliding window                       -> perplexity, loss, n (tokens)
    sft         chat / alpaca / completion file, answer tokens   -> perplexity, loss, n (tokens)
    qa          SQuAD JSON (or JSONL of context/question/answers) -> exact_match, f1, n
    translate   TSV of source<TAB>target, or --data SRC --target TGT line-aligned files
                                                                 -> bleu, chrf (sacrebleu), n
    summarize   JSONL of document/summary                        -> rouge1, rouge2, rougeL, n

The prompts that turn a task item into a chat message live here, and `finetune sft --task` trains
on the same prompts, so a model is scored the way it was taught.
"""
from __future__ import annotations

import collections
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path

from .data import read_records, read_text
from .errors import LlamaforgeError

TASKS = ("perplexity", "sft", "qa", "translate", "summarize")
GENERATION_TASKS = ("qa", "translate", "summarize")
MAX_NEW_TOKENS = {"qa": 32, "translate": 96, "summarize": 128}


@dataclass
class TaskItem:
    source: str              # "file:line" (or "file: question <id>")
    messages: list[dict]     # the prompt, as a conversation ending with a user turn
    references: list[str]    # acceptable answers; the first is the one trained on


# --- prompts -------------------------------------------------------------------------------------

def qa_prompt(context: str, question: str) -> str:
    return (f"Answer the question with a short span copied from the context.\n\n"
            f"Context: {context}\n\nQuestion: {question}")


def translate_prompt(text: str, target_lang: str, source_lang: str | None = None) -> str:
    source = f" from {source_lang}" if source_lang else ""
    return f"Translate the following text{source} into {target_lang}. Reply with the translation only.\n\n{text}"


def summarize_prompt(document: str) -> str:
    return f"Summarize the following text in one or two sentences.\n\n{document}"


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- task files ----------------------------------------------------------------------------------

def read_qa(path) -> list[TaskItem]:
    """SQuAD v1.1 JSON ({"data": [{"paragraphs": [{"context", "qas": [...]}]}]}), or JSONL / JSON
    records with context, question and answers (a list of strings or of {"text": ...})."""
    path = Path(path)
    items = []
    if path.suffix.lower() == ".json":
        import json
        try:
            raw = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise LlamaforgeError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(raw, dict) and "data" in raw:
            for a, article in enumerate(raw["data"]):
                for p, para in enumerate(article.get("paragraphs", [])):
                    for q in para.get("qas", []):
                        where = f"{path}: question {q.get('id', f'{a}/{p}')}"
                        answers = [x["text"] for x in q.get("answers", []) if isinstance(x, dict) and "text" in x]
                        if "question" not in q or not answers or "context" not in para:
                            raise LlamaforgeError(f"{where}: needs a context, a question and at least one answer")
                        items.append(TaskItem(where, _user(qa_prompt(para["context"], q["question"])), answers))
            if not items:
                raise LlamaforgeError(f"{path}: no questions")
            return items
    for line, r in read_records(path):
        where = f"{path}:{line}"
        for key in ("context", "question", "answers"):
            if key not in r:
                raise LlamaforgeError(f"{where}: missing field {key!r}")
        answers = r["answers"]
        if isinstance(answers, dict):   # the HF datasets layout: {"text": [...], "answer_start": [...]}
            answers = answers.get("text", [])
        answers = [answers] if isinstance(answers, str) else [a.get("text") if isinstance(a, dict) else a for a in answers]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise LlamaforgeError(f"{where}: 'answers' must be a string or a non-empty list of strings")
        items.append(TaskItem(where, _user(qa_prompt(r["context"], r["question"])), answers))
    return items


def read_translation(path, target: str | None = None, target_lang: str = "English",
                     source_lang: str | None = None) -> list[TaskItem]:
    """Pairs from a TSV (source<TAB>target per line, no header) or two line-aligned files."""
    path = Path(path)
    if target:
        src, tgt = read_text(path).splitlines(), read_text(target).splitlines()
        if len(src) != len(tgt):
            raise LlamaforgeError(f"{path} has {len(src)} lines but {target} has {len(tgt)}: they must be aligned")
        pairs = [(f"{path}:{i + 1}", s, t) for i, (s, t) in enumerate(zip(src, tgt))]
    else:
        pairs = []
        for i, line in enumerate(read_text(path).splitlines()):
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) != 2:
                raise LlamaforgeError(f"{path}:{i + 1}: expected source<TAB>target, found {len(cols)} column(s) "
                                      f"(for two aligned files give --target FILE)")
            pairs.append((f"{path}:{i + 1}", cols[0], cols[1]))
    items = []
    for where, s, t in pairs:
        if not s.strip() or not t.strip():
            raise LlamaforgeError(f"{where}: empty sentence")
        items.append(TaskItem(where, _user(translate_prompt(s.strip(), target_lang, source_lang)), [t.strip()]))
    if not items:
        raise LlamaforgeError(f"{path}: no sentence pairs")
    return items


def read_summaries(path) -> list[TaskItem]:
    """JSONL / JSON records with the text in `document` (or `article`, `text`) and the summary
    in `summary` (or `highlights`)."""
    items = []
    for line, r in read_records(path):
        where = f"{path}:{line}"
        doc = next((r[k] for k in ("document", "article", "text") if k in r), None)
        summary = next((r[k] for k in ("summary", "highlights") if k in r), None)
        if not isinstance(doc, str) or not isinstance(summary, str):
            raise LlamaforgeError(f"{where}: needs string fields 'document' and 'summary'")
        items.append(TaskItem(where, _user(summarize_prompt(doc)), [summary]))
    return items


def read_task(path, task: str, target: str | None = None, target_lang: str = "English",
              source_lang: str | None = None) -> list[TaskItem]:
    if task == "qa":
        return read_qa(path)
    if task == "translate":
        return read_translation(path, target, target_lang, source_lang)
    if task == "summarize":
        return read_summaries(path)
    raise LlamaforgeError(f"unknown task {task!r}; use one of {', '.join(GENERATION_TASKS)}")


# --- metrics -------------------------------------------------------------------------------------

def squad_normalize(text: str) -> str:
    """SQuAD v1.1's official answer normalisation: lower case, no punctuation, no articles
    (a, an, the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = squad_normalize(prediction).split(), squad_normalize(reference).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_qa(predictions: list[str], references: list[list[str]]) -> dict:
    """Exact match and token F1, in percent, each the best over an item's references."""
    em = sum(max(float(squad_normalize(p) == squad_normalize(r)) for r in refs) for p, refs in zip(predictions, references))
    f1 = sum(max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references))
    n = len(predictions)
    return {"exact_match": 100 * em / n, "f1": 100 * f1 / n, "n": n}


def score_translation(predictions: list[str], references: list[list[str]]) -> dict:
    import sacrebleu
    refs = [[r[0] for r in references]]
    return {"bleu": sacrebleu.corpus_bleu(predictions, refs).score,
            "chrf": sacrebleu.corpus_chrf(predictions, refs).score, "n": len(predictions)}


def score_summaries(predictions: list[str], references: list[list[str]]) -> dict:
    """Mean ROUGE-1/2/L F-measure in percent (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = collections.Counter()
    for p, refs in zip(predictions, references):
        for k, s in scorer.score(refs[0], p).items():
            totals[k] += s.fmeasure
    n = len(predictions)
    return {k: 100 * totals[k] / n for k in ("rouge1", "rouge2", "rougeL")} | {"n": n}


SCORERS = {"qa": score_qa, "translate": score_translation, "summarize": score_summaries}


# --- running a model -----------------------------------------------------------------------------

def answer(model, tok, items: list[TaskItem], max_new_tokens: int, batch_size: int = 8,
           progress: bool = False) -> list[str]:
    """Greedy answers to the items' prompts, in order; batches of similar prompt length."""
    from tqdm import tqdm

    from .data import length_bucketed_batches
    from .generation import SamplingConfig, generate_from_ids
    prompts = [tok.encode(tok.apply_chat_template(it.messages), add_special_tokens=False) for it in items]
    limit = model.config.max_seq_len - max_new_tokens
    for it, p in zip(items, prompts):
        if len(p) > limit:
            raise LlamaforgeError(f"{it.source}: the prompt has {len(p)} tokens; with {max_new_tokens} new tokens "
                                  f"that exceeds the model's context of {model.config.max_seq_len}")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0)
    out = [""] * len(items)
    for idx in tqdm(length_bucketed_batches([len(p) for p in prompts], batch_size), desc="generate", unit="batch",
                    file=sys.stderr, disable=not progress, dynamic_ncols=True):
        for i, text in zip(idx, generate_from_ids(model, tok, [prompts[i] for i in idx], cfg)):
            out[i] = text.strip()
    model.clear_cache()
    return out


def evaluate_model(model: str, task: str, data, fmt: str = "auto", target: str | None = None,
                   target_lang: str = "English", source_lang: str | None = None, dtype: str = "bf16",
                   batch_size: int = 8, window: int | None = None, max_new_tokens: int | None = None,
                   limit: int | None = None, predictions_out: str | None = None) -> dict:
    """The task's metrics for a model or run directory on a data file."""
    from .loader import load
    if task not in TASKS:
        raise LlamaforgeError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    net, tok = load(model, dtype=dtype)
    if task == "perplexity":
        from .lm import perplexity
        ids = tok.encode(read_text(data), add_special_tokens=False)
        if len(ids) < 2:
            raise LlamaforgeError(f"{data}: too little text to score (needs at least 2 tokens)")
        window = window or min(net.config.max_seq_len, 1024)
        if not 2 <= window <= net.config.max_seq_len:
            raise LlamaforgeError(f"--window must be between 2 and the model's context ({net.config.max_seq_len}), got {window}")
        return perplexity(net, ids, window, batch_size=batch_size, progress=True)
    if task == "sft":
        import math

        from .conversations import encode_examples, read_examples
        from .lm import mean_loss
        examples = read_examples(data, fmt)[:limit]
        if not examples:
            raise LlamaforgeError(f"{data}: nothing to score (--limit {limit})")
        pairs = encode_examples(tok, examples, net.config.max_seq_len, net.config.max_seq_len, name=str(data))
        loss, n = mean_loss(net, pairs, tok.pad_id, batch_size, progress=True)
        return {"perplexity": math.exp(loss), "loss": loss, "n": n}
    items = read_task(data, task, target, target_lang, source_lang)[:limit]
    if not items:
        raise LlamaforgeError(f"{data}: nothing to score (--limit {limit})")
    predictions = answer(net, tok, items, max_new_tokens or MAX_NEW_TOKENS[task], batch_size, progress=True)
    if predictions_out:
        import json

        from .atomic import atomic_write_text
        atomic_write_text(predictions_out, "".join(json.dumps({"source": it.source, "prediction": p, "references": it.references},
                                                              ensure_ascii=False) + "\n" for it, p in zip(items, predictions)))
    return SCORERS[task](predictions, [it.references for it in items])


def format_scores(scores: dict) -> str:
    return "\n".join(f"{k:>12}  {v:.4f}" if isinstance(v, float) else f"{k:>12}  {v}" for k, v in scores.items())

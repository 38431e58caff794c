"""Task definitions, shared by evaluation and training: how a file of QA items, translation pairs
or documents with summaries is read, the prompt that turns each item into a chat message, how the
answers are scored. `llamaforge evaluate --task` scores a model on these prompts and `finetune sft
--task` trains on the same ones (`training_examples`), so a model is scored the way it was taught.
`GENERATION_TASKS` is the one table of them that the command line, evaluation and training read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..data.conversations import Example
from ..data.records import read_records
from ..errors import LlamaforgeError
from ..files import read_json, read_lines
from .metrics import score_qa, score_summaries, score_translation


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
        raw = read_json(path, expect=None)
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


# ISO 639-1 codes of the languages a translation file may name, with the names the prompt uses.
LANGUAGES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
             "nl": "Dutch", "ru": "Russian", "uk": "Ukrainian", "pl": "Polish", "cs": "Czech", "ro": "Romanian",
             "sv": "Swedish", "da": "Danish", "fi": "Finnish", "el": "Greek", "hu": "Hungarian", "tr": "Turkish",
             "ar": "Arabic", "he": "Hebrew", "fa": "Persian", "hi": "Hindi", "zh": "Chinese", "ja": "Japanese",
             "ko": "Korean", "vi": "Vietnamese", "th": "Thai", "id": "Indonesian"}


def language_name(text: str | None) -> str | None:
    """The language a code ("de", "zh-CN") or name ("german") stands for, or None."""
    t = (text or "").strip()
    if t.lower().split("-")[0].split("_")[0] in LANGUAGES:
        return LANGUAGES[t.lower().split("-")[0].split("_")[0]]
    return next((name for name in LANGUAGES.values() if name.lower() == t.lower()), None)


def read_translation(path, target: str | None = None, target_lang: str | None = None,
                     source_lang: str | None = None) -> list[TaskItem]:
    """Pairs from a TSV (source<TAB>target per line) or two line-aligned files.

    The languages come from the flags, else from the data: a TSV's first row may name them (codes
    or names, e.g. `en<TAB>de`), two aligned files their suffixes (`test.en`, `test.de`). Where
    neither says the language to translate into, it is an error, not a guess."""
    path = Path(path)
    if target:
        src, tgt = read_lines(path), read_lines(target)
        if len(src) != len(tgt):
            raise LlamaforgeError(f"{path} has {len(src)} lines but {target} has {len(tgt)}: they must be aligned")
        pairs = [(f"{path}:{i + 1}", s, t) for i, (s, t) in enumerate(zip(src, tgt, strict=True))]
        named = (language_name(path.suffix[1:]), language_name(Path(target).suffix[1:]))
    else:
        pairs, named = [], (None, None)
        for i, line in enumerate(read_lines(path)):
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) != 2:
                raise LlamaforgeError(f"{path}:{i + 1}: expected source<TAB>target, found {len(cols)} column(s) "
                                      f"(for two aligned files give --target FILE)")
            header = [language_name(c) for c in cols]
            if not pairs and named == (None, None) and all(header):
                named = tuple(header)   # a header row naming the languages
                continue
            pairs.append((f"{path}:{i + 1}", cols[0], cols[1]))
    source_lang, target_lang = source_lang or named[0], target_lang or named[1]
    if not target_lang:
        raise LlamaforgeError(f"{path}: the data does not say which language to translate into: give --target-lang, "
                              f"or begin the TSV with a row of the two languages (e.g. en<TAB>de)")
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


# --- the table -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationTask:
    data: str                                       # what its file holds (for --help)
    read: Callable[..., list[TaskItem]]             # (path) -> items; translate takes its languages too
    score: Callable[[list[str], list[list[str]]], dict]   # (answers, references) -> metrics
    max_new_tokens: int                             # answer length when scored


GENERATION_TASKS = {
    "qa": GenerationTask("SQuAD JSON, or JSONL of context/question/answers", read_qa, score_qa, 32),
    "translate": GenerationTask("TSV of source<TAB>target, or --data SRC --target TGT", read_translation,
                                score_translation, 96),
    "summarize": GenerationTask("JSONL of document/summary", read_summaries, score_summaries, 128),
}
# Every task `llamaforge evaluate` knows: the first two are scored by the next-token loss.
TASKS = ("perplexity", "sft", "preference", *GENERATION_TASKS)


def read_task(path, task: str, target: str | None = None, target_lang: str = "English",
              source_lang: str | None = None) -> list[TaskItem]:
    if task not in GENERATION_TASKS:
        raise LlamaforgeError(f"unknown task {task!r}; use one of {', '.join(GENERATION_TASKS)}")
    if task == "translate":
        return read_translation(path, target, target_lang, source_lang)
    return GENERATION_TASKS[task].read(path)


def training_examples(items: list[TaskItem]) -> list[Example]:
    """The items as chat examples to learn from: the prompt, answered with the first reference."""
    return [Example(item.source, messages=item.messages + [{"role": "assistant", "content": item.references[0]}])
            for item in items]

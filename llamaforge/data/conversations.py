"""Instruction data: records of any supported shape become `Example`s, and examples become token
ids with a loss mask that covers only what the model should learn to write.

Shapes (`--format`):
    chat        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    alpaca      {"instruction": str, "input": str (optional), "output": str}
    completion  {"prompt": str, "completion": str}
Task files (`--task`: QA, translation, summaries) become chat examples in `evaluate/tasks.py`,
through the same prompts that evaluation scores.

Chat and alpaca examples are rendered with the model's chat template (a ChatML default where the
model has none); completion examples are plain text, prompt then completion then EOS.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from ..errors import LlamaforgeError
from .records import read_records

FORMATS = ("auto", "chat", "alpaca", "completion")
ROLES = ("system", "user", "assistant")
IGNORE = -100   # label of a position that is not scored (PyTorch's cross_entropy ignore_index)


@dataclass
class Example:
    source: str                           # "file:line", for messages about this example
    messages: list[dict] | None = None    # chat form: rendered with the chat template
    prompt: str | None = None             # completion form: plain text
    completion: str | None = None


def detect_format(record: dict, source: str) -> str:
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "completion"
    raise LlamaforgeError(f"{source}: cannot tell the format: expected 'messages' (chat), 'instruction' + "
                          f"'output' (alpaca) or 'prompt' + 'completion'; found {', '.join(record) or 'no fields'}")


def _text_field(record: dict, key: str, source: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise LlamaforgeError(f"{source}: missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise LlamaforgeError(f"{source}: field {key!r} must be a string, not {type(value).__name__}")
    return value


def checked_messages(value, source: str, field: str = "messages", roles=ROLES, also: str = "") -> list[dict]:
    """value as a list of {role, content} messages (only those keys), or an error naming the
    field and the message. also: what else the field may be, for the error ("a string or ")."""
    if not isinstance(value, list) or not value:
        raise LlamaforgeError(f"{source}: {field!r} must be {also}a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in roles or not isinstance(m.get("content"), str):
            raise LlamaforgeError(f"{source}: {field!r} message {i + 1} needs a role ({', '.join(roles)}) and a "
                                  f"string content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_example(record: dict, fmt: str, source: str) -> Example:
    if fmt == "auto":
        fmt = detect_format(record, source)
    if fmt == "chat":
        messages = checked_messages(record.get("messages"), source)
        if not any(m["role"] == "assistant" for m in messages):
            raise LlamaforgeError(f"{source}: the conversation has no assistant turn, so nothing to learn from")
        return Example(source, messages=messages)
    if fmt == "alpaca":
        instruction = _text_field(record, "instruction", source)
        extra = _text_field(record, "input", source, required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example(source, messages=[{"role": "user", "content": user},
                                         {"role": "assistant", "content": _text_field(record, "output", source)}])
    if fmt == "completion":
        return Example(source, prompt=_text_field(record, "prompt", source),
                       completion=_text_field(record, "completion", source))
    raise LlamaforgeError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def read_examples(path, fmt: str = "auto") -> list[Example]:
    """Examples from a chat / alpaca / completion file."""
    if fmt not in FORMATS:
        raise LlamaforgeError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    examples = [to_example(record, fmt, f"{path}:{line}") for line, record in read_records(path)]
    if not examples:
        raise LlamaforgeError(f"{path}: no examples")
    return examples


# --- tokens and the loss mask ---------------------------------------------------------------------

def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant) pieces.

    Each assistant turn is what the template adds between the prompt for that turn (history with
    the generation prompt) and the history including the turn: the reply and its end-of-turn
    marker, which the model must learn to emit so that it stops.
    """
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise LlamaforgeError("the chat template does not render a conversation as a growing prefix; "
                                  "cannot tell which tokens are the assistant's")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(t, a) for t, a in segments if t]


def encode_example(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """(token ids, labels): labels equal the ids on assistant / completion tokens, IGNORE elsewhere.

    The whole text is tokenized once, exactly as inference will see it, and each token is scored
    when it starts inside an assistant (or completion) span of characters. Tokenizing the pieces
    apart would not do: a SentencePiece tokenizer puts a "▁" before every piece.
    """
    if ex.messages is None:
        text, spans, special = ex.prompt + ex.completion, [(len(ex.prompt), len(ex.prompt) + len(ex.completion))], True
    else:
        text, spans, pos = "", [], 0
        for piece, is_assistant in chat_segments(tokenizer, ex.messages):
            if is_assistant:
                spans.append((pos, pos + len(piece)))
            text += piece
            pos += len(piece)
        special = False   # the template writes BOS itself where the model wants one
    ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=special)
    labels = [t if any(a <= start < b for a, b in spans) and end > start else IGNORE
              for t, (start, end) in zip(ids, offsets, strict=True)]
    if ex.messages is None and tokenizer.eos_id is not None:   # a completion ends with EOS
        ids, labels = ids + [tokenizer.eos_id], labels + [tokenizer.eos_id]
    return ids, labels


def encode_examples(tokenizer, examples: list[Example], max_length: int, context: int,
                    name: str = "data") -> list[tuple[list[int], list[int]]]:
    """Encoded examples, truncated to max_length; a count of truncated ones goes to stderr. One
    longer than the model's context is an error (it could never be seen whole); one left with
    no scored token after truncation is dropped (and counted)."""
    out, truncated, dropped = [], 0, 0
    for ex in examples:
        ids, labels = encode_example(tokenizer, ex)
        if len(ids) > context:
            raise LlamaforgeError(f"{ex.source}: {len(ids)} tokens, longer than the model's context of {context}")
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE for t in labels[1:]):
            dropped += 1
            continue
        out.append((ids, labels))
    if truncated or dropped:
        print(f"llamaforge: {name}: {truncated} of {len(examples)} examples longer than {max_length} tokens were "
              f"truncated" + (f"; {dropped} left with no answer tokens were dropped" if dropped else "")
              + " (raise --max-length to keep them whole)", file=sys.stderr)
    if not out:
        raise LlamaforgeError(f"{name}: no example has a token to learn from")
    return out

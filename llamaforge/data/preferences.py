"""Preference pairs for DPO and its kin: a prompt, a chosen and a rejected answer.

The layout TRL and the HF preference data sets use, one JSON object a line (or a JSON list):
    {"prompt": str | [messages], "chosen": str | [assistant messages], "rejected": ...}
A prompt of messages is rendered with the model's chat template (with the generation prompt),
and an answer then follows as the assistant's turn, its end-of-turn marker included; a string
prompt is plain text, and a string answer follows it with EOS (TRL's "standard" format). Only
the answer's tokens are scored.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LlamaforgeError
from .conversations import IGNORE, ROLES, checked_messages
from .records import read_records


@dataclass
class Pair:
    source: str                      # "file:line"
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]


def to_pair(record: dict, source: str) -> Pair:
    for field in ("prompt", "chosen", "rejected"):
        if field not in record:
            raise LlamaforgeError(f"{source}: missing field {field!r} (a preference pair has prompt, chosen, rejected)")
    values = {}
    for field in ("prompt", "chosen", "rejected"):
        value = record[field]
        if isinstance(value, str):
            values[field] = value
        else:
            values[field] = checked_messages(value, source, field, ROLES if field == "prompt" else ("assistant",),
                                             also="a string or ")
    if any(isinstance(values[f], list) for f in ("chosen", "rejected")) and isinstance(values["prompt"], str):
        raise LlamaforgeError(f"{source}: answers given as messages need a prompt of messages too")
    if values["chosen"] == values["rejected"]:
        raise LlamaforgeError(f"{source}: 'chosen' and 'rejected' are the same answer")
    return Pair(source, values["prompt"], values["chosen"], values["rejected"])


def read_pairs(path) -> list[Pair]:
    pairs = [to_pair(record, f"{path}:{line}") for line, record in read_records(path)]
    if not pairs:
        raise LlamaforgeError(f"{path}: no preference pairs")
    return pairs


def _answer_text(answer: str | list[dict]) -> str:
    return answer if isinstance(answer, str) else "".join(m["content"] for m in answer)


def encode_pair(tok, pair: Pair, max_length: int) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids): the answers with their end marker. A pair longer
    than max_length loses the start of its prompt first, then the end of its answers."""
    if isinstance(pair.prompt, list):
        prompt_text = tok.apply_chat_template(pair.prompt, add_generation_prompt=True)
        prompt = tok.encode(prompt_text, add_special_tokens=False)
        answers = []
        for answer in (pair.chosen, pair.rejected):
            full = tok.apply_chat_template(pair.prompt + [{"role": "assistant", "content": _answer_text(answer)}],
                                           add_generation_prompt=False)
            if not full.startswith(prompt_text):
                raise LlamaforgeError(f"{pair.source}: the chat template does not render the answer after the prompt")
            answers.append(tok.encode(full[len(prompt_text):], add_special_tokens=False))
    else:
        prompt = tok.encode(pair.prompt)
        end = [tok.eos_id] if tok.eos_id is not None else []
        answers = [tok.encode(_answer_text(a), add_special_tokens=False) + end for a in (pair.chosen, pair.rejected)]
    longest = max(len(a) for a in answers)
    prompt = prompt[max(0, len(prompt) + longest - max_length):] if len(prompt) + longest > max_length else prompt
    room = max(1, max_length - len(prompt))
    return prompt, answers[0][:room], answers[1][:room]


def scored_rows(encoded: list[tuple[list[int], list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) rows, chosen then rejected of each pair in turn: one forward pass for both;
    labels only on the answer."""
    rows = []
    for prompt, chosen, rejected in encoded:
        for answer in (chosen, rejected):
            rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    return rows

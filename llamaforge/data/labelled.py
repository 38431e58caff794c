"""Labelled texts for classification: rows of text (and an optional second text) with a label,
the label set, and their token ids, truncated from either side."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlamaforgeError
from .records import FORMATS, read_records


@dataclass
class LabelledText:
    text: str
    pair: str | None
    label: str | None
    source: str            # "file:line", for messages


def read_labelled(path: str | Path, text_column: str = "text", label_column: str | None = "label",
                  text_pair_column: str | None = None) -> list[LabelledText]:
    """Labelled (or, with label_column=None, unlabelled) texts; every row must have every column."""
    path = Path(path)
    records = read_records(path)
    columns = [c for c in (text_column, text_pair_column, label_column) if c]
    first = records[0][1]
    header_line = 1 if FORMATS[path.suffix.lower()] in ("csv", "tsv") else records[0][0]
    flags = {text_column: "--text-column", text_pair_column: "--text-pair-column", label_column: "--label-column"}
    for c in columns:
        if c not in first:
            raise LlamaforgeError(f"{path}:{header_line}: no column {c!r} (found: {', '.join(map(str, first))}); "
                                  f"name it with {flags[c]}")
    out = []
    for line, rec in records:
        values = {}
        for c in columns:
            v = rec.get(c)
            if v is None or (isinstance(v, str) and not v.strip()):
                raise LlamaforgeError(f"{path}:{line}: empty or missing {c!r}")
            if isinstance(v, (dict, list)):
                raise LlamaforgeError(f"{path}:{line}: {c!r} must be text or a number, found {type(v).__name__}")
            values[c] = str(v).strip() if c == label_column else str(v)
        out.append(LabelledText(values[text_column], values.get(text_pair_column),
                                values.get(label_column), f"{path}:{line}"))
    return out


def label_names(examples: list[LabelledText]) -> list[str]:
    """The label set of training data, in a stable order: numerically when every label is an
    integer (so ids 0/1 stay 0/1), else alphabetically."""
    labels = {e.label for e in examples}
    if all(_is_int(x) for x in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def label_ids(examples: list[LabelledText], labels: list[str]) -> list[int]:
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for e in examples:
        if e.label not in index:
            raise LlamaforgeError(f"{e.source}: label {e.label!r} never seen in the training data "
                                  f"(known: {', '.join(labels)})")
        out.append(index[e.label])
    return out


def check_truncation_side(side: str):
    if side not in ("right", "left"):
        raise LlamaforgeError(f"truncation-side must be right or left, not {side!r}")


def encode_texts(tokenizer, examples: list[LabelledText], max_length: int, name: str = "data",
                 report=True, truncation_side: str = "right") -> list[list[int]]:
    """Token ids per example, truncated to max_length (the count of truncated texts is reported
    on stderr). A pair is joined by the EOS token, the longer side truncated first.
    truncation_side: "right" drops a long text's end, "left" its beginning (as HF tokenizers'
    `truncation_side`)."""
    check_truncation_side(truncation_side)
    firsts = tokenizer.encode_batch([e.text for e in examples])
    seconds = tokenizer.encode_batch([e.pair for e in examples]) if examples and examples[0].pair is not None else None
    sep = [tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.pad_id]
    bos = tokenizer.bos_id if tokenizer.add_bos else None

    def cut(ids, n):
        """ids shortened to n tokens; from the left, a leading BOS stays in front (as HF's)."""
        if truncation_side == "right":
            return ids[:n]
        keep = 1 if n > 0 and bos is not None and ids[:1] == [bos] else 0
        return ids[:keep] + ids[len(ids) - (n - keep):]
    out, truncated = [], 0
    for i, a in enumerate(firsts):
        b = seconds[i] if seconds else None
        room = max_length - (len(sep) if b is not None else 0)
        n_total = len(a) + (len(b) if b is not None else 0)
        if n_total > room:
            truncated += 1
            if b is None:
                a = cut(a, room)
            else:
                while len(a) + len(b) > room:   # longest first, as HF's "longest_first"
                    if len(a) >= len(b):
                        a = cut(a, len(a) - 1)
                    else:
                        b = cut(b, len(b) - 1)
        out.append(a + sep + b if b is not None else a)
    if truncated and report:
        print(f"llamaforge: {name}: {truncated} of {len(examples)} texts longer than {max_length} tokens "
              f"were truncated (raise --max-length to keep them whole)", file=sys.stderr)
    return out

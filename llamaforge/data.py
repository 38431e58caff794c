"""Data readers and batching: CSV / TSV / JSONL / JSON records with their line numbers, labelled
examples and label maps, and length-bucketed batches.

Every reader error names the file and the line, so a user can open the file and fix it.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LlamaforgeError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}


def read_text(path: str | Path) -> str:
    """A file's text: UTF-8 (a BOM is dropped), not empty; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LlamaforgeError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise LlamaforgeError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                              f"convert it, e.g. iconv -f GBK -t UTF-8") from None
    if not text.strip():
        raise LlamaforgeError(f"{path}: empty file")
    return text


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a .csv / .tsv (header row), .jsonl or .json (a list of
    objects) file."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LlamaforgeError(f"{path}: unknown data format {path.suffix!r} (use .csv, .tsv, .jsonl or .json)")
    text = read_text(path)
    records = {"csv": _read_delimited, "tsv": _read_delimited, "jsonl": _read_jsonl, "json": _read_json}[fmt](path, text, fmt)
    if not records:
        raise LlamaforgeError(f"{path}: no records")
    return records


def _read_delimited(path: Path, text: str, fmt: str) -> list[tuple[int, dict]]:
    # TSV files such as GLUE's are not quoted: a quote character is text, not a field delimiter.
    reader = csv.reader(text.splitlines(keepends=True), delimiter="\t" if fmt == "tsv" else ",",
                        quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
    try:
        header = next(reader)
        records = []
        for row in reader:
            if not row or not any(c.strip() for c in row):
                continue   # blank line
            if len(row) != len(header):
                raise LlamaforgeError(f"{path}:{reader.line_num}: expected {len(header)} fields "
                                      f"({', '.join(header)}), found {len(row)}")
            records.append((reader.line_num, dict(zip(header, row))))
    except csv.Error as e:
        raise LlamaforgeError(f"{path}:{reader.line_num}: unparsable row ({e})") from None
    return records


def _read_jsonl(path: Path, text: str, fmt: str) -> list[tuple[int, dict]]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlamaforgeError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise LlamaforgeError(f"{path}:{n}: expected a JSON object, found {type(obj).__name__}")
        records.append((n, obj))
    return records


def _read_json(path: Path, text: str, fmt: str) -> list[tuple[int, dict]]:
    """A JSON array of objects, decoded one element at a time so each keeps its line number."""
    decoder = json.JSONDecoder()

    def line_of(pos):
        return text.count("\n", 0, pos) + 1

    def skip_ws(pos):
        while pos < len(text) and text[pos].isspace():
            pos += 1
        return pos

    pos = skip_ws(0)
    if pos >= len(text) or text[pos] != "[":
        raise LlamaforgeError(f"{path}:{line_of(pos)}: expected a JSON array of objects")
    pos, records = skip_ws(pos + 1), []
    while pos < len(text) and text[pos] != "]":
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise LlamaforgeError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise LlamaforgeError(f"{path}:{line_of(pos)}: expected a JSON object, found {type(obj).__name__}")
        records.append((line_of(pos), obj))
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < len(text) and text[pos] != "]":
            raise LlamaforgeError(f"{path}:{line_of(pos)}: invalid JSON (expected ',' or ']')")
    if pos >= len(text):
        raise LlamaforgeError(f"{path}:{line_of(pos)}: invalid JSON (unterminated array)")
    return records


# --- labelled text -----------------------------------------------------------------------------

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


# --- batching ----------------------------------------------------------------------------------

def length_bucketed_batches(lengths: list[int], batch_size: int, generator: torch.Generator | None = None,
                            bucket_batches: int = 50) -> list[list[int]]:
    """Index batches of similar length, so dynamic padding wastes almost nothing.

    With a generator (training): shuffle, sort each window of `bucket_batches` batches by length,
    cut it into batches, shuffle the batches, so order stays random but lengths within a batch
    match. Without (evaluation): sorted by length, longest first (a too-long batch fails at once).
    """
    n = len(lengths)
    if generator is None:
        order = sorted(range(n), key=lambda i: -lengths[i])
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    perm = torch.randperm(n, generator=generator).tolist()
    window = batch_size * bucket_batches
    batches = []
    for s in range(0, n, window):
        chunk = sorted(perm[s:s + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) padded on the right to the longest, lengths (B,))."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs])


# --- causal-LM batches: padded, or packed --------------------------------------------------------

def pad_labelled(pairs: list[tuple[list[int], list[int]]], pad_id: int, ignore: int = -100):
    """(ids, labels), each (B, T), padded on the right; padding is never scored."""
    ids, _ = pad_right([p[0] for p in pairs], pad_id)
    labels = torch.full(ids.shape, ignore, dtype=torch.long)
    for i, (_, lab) in enumerate(pairs):
        labels[i, :len(lab)] = torch.tensor(lab, dtype=torch.long)
    return ids, labels


def pack_rows(lengths: list[int], max_length: int, generator: torch.Generator, window: int = 1000) -> list[list[int]]:
    """Example indices grouped into rows of at most max_length tokens.

    Order is shuffled; then, window by window, the longest examples are placed first, each into
    the first row with room (first-fit decreasing fills rows to ~95%+), and the rows shuffled.
    """
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    rows = []
    for s in range(0, len(perm), window):
        open_rows: list[tuple[int, list[int]]] = []   # (free tokens, indices)
        for i in sorted(perm[s:s + window], key=lambda i: -lengths[i]):
            for r, (free, idx) in enumerate(open_rows):
                if lengths[i] <= free:
                    open_rows[r] = (free - lengths[i], idx + [i])
                    break
            else:
                open_rows.append((max_length - lengths[i], [i]))
        rows += [idx for _, idx in open_rows]
    order = torch.randperm(len(rows), generator=generator).tolist()
    return [rows[i] for i in order]


def packed_batch(pairs: list[tuple[list[int], list[int]]], rows: list[list[int]], pad_id: int, ignore: int = -100):
    """(ids, labels, position_ids, mask) for rows of packed examples.

    Positions restart at 0 for each example and the boolean mask (B, 1, T, T) is causal within
    an example only, so a packed example computes exactly what it would alone.
    """
    T = max(sum(len(pairs[i][0]) for i in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), ignore, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)   # padding forms one more "document"
    for b, row in enumerate(rows):
        s = 0
        for d, i in enumerate(row):
            x, y = pairs[i]
            ids[b, s:s + len(x)] = torch.tensor(x)
            labels[b, s:s + len(y)] = torch.tensor(y)
            labels[b, s] = ignore   # never predicted from the previous example's last token
            pos[b, s:s + len(x)] = torch.arange(len(x))
            doc[b, s:s + len(x)] = d
            s += len(x)
        pos[b, s:] = torch.arange(T - s)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return ids, labels, pos, mask[:, None]

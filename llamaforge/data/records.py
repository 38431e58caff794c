"""Records from data files, each with its line number so that every error can name the file and
line: CSV and TSV (a header row), JSON lines, and a JSON array of objects."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import LlamaforgeError
from ..files import read_text

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}


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
    # Lines end at \n or \r\n only, as the csv module reads a file opened with newline="": a
    # U+2028 or U+0085 inside a field is text. TSV files such as GLUE's are not quoted: a quote
    # character is text there, not a field delimiter. strict: a quote never closed is an error,
    # not the rest of the file read into one field.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",",
                        quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL, strict=True)
    records, header, start = [], None, 1   # start: the line where the row being read begins
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            hint = "; a quote opened on this line is never closed" if "end of data" in str(e) else ""
            raise LlamaforgeError(f"{path}:{start}: unparsable row ({e}{hint})") from None
        line, start = start, reader.line_num + 1
        if header is None:
            header = row
        elif row and any(c.strip() for c in row):   # not a blank line
            if len(row) != len(header):
                raise LlamaforgeError(f"{path}:{line}: expected {len(header)} fields "
                                      f"({', '.join(header)}), found {len(row)}")
            records.append((line, dict(zip(header, row, strict=True))))
    return records


def _read_jsonl(path: Path, text: str, fmt: str) -> list[tuple[int, dict]]:
    records = []
    for n, line in enumerate(text.split("\n"), 1):   # JSON lines end at \n; U+2028 is text
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

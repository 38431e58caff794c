"""Plain-text corpora (for pretraining and tokenizer training): a file, or a directory of text
files, read as documents separated by blank lines."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import LlamaforgeError
from ..files import read_text


def corpus_files(path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ""))
        if not files:
            raise LlamaforgeError(f"{path}: no text files (*.txt) in the directory")
        return files
    if not path.exists():
        raise LlamaforgeError(f"{path}: no such file or directory")
    return [path]


def documents(files: list[Path]):
    """Documents: the blank-line-separated blocks of each file (stories, paragraphs)."""
    for f in files:
        for doc in re.split(r"\n\s*\n", read_text(f)):
            if doc.strip():
                yield doc.strip()

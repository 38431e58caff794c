"""`llamaforge export`: read any supported checkpoint, write it as an HF directory or a GGUF file."""
from __future__ import annotations

from pathlib import Path

from .errors import LlamaforgeError
from .formats import gguf, hf
from .formats.load import load_checkpoint, parse_dtype
from .provenance.modelcard import HF_LICENSE_TAGS, base_terms, licence_warnings, warn, write_model_card


def export(model: str, to: str, out: str, dtype: str = "fp32", quant: str = "F32", license: str | None = None) -> Path:
    """Write `model` as an HF directory (with a model card) or a GGUF file (its card beside it,
    OUT.README.md). license: the licence
    tag to give the output (default: the source's); a tag that contradicts the source's terms
    is warned about before anything is written."""
    terms = base_terms(model)
    warn(licence_warnings(terms, out, license))
    ckpt = load_checkpoint(model)
    if ckpt.prefix is not None:
        raise LlamaforgeError(f"{model}: a prefix-tuned model has no place for its prefix in {to} files; "
                              f"use it as it is, or fine-tune with --method lora or full to export")
    def card(d, filename="README.md"):
        write_model_card(d, recipe="export", title=f"{Path(out).name} (exported by llamaforge)", base_model=model,
                         config={"model": model, "to": to, "dtype": dtype, "quant": quant}, data=[], metrics={},
                         license_tag=license, terms=terms, filename=filename)

    if to == "hf":
        hf.save(ckpt, out, dtype=parse_dtype(dtype), extra=card)
    elif to == "gguf":
        if Path(out).exists():
            raise LlamaforgeError(f"{out}: exists")
        lid = terms["license"]["id"] if terms else None
        tag = license or (HF_LICENSE_TAGS.get(lid, lid) if lid else None)
        if tag:   # the file itself says its licence, whatever format the source was in
            ckpt.metadata["license"] = {"general.license": tag}
        gguf.save(ckpt, out, qtype=quant)
        # A single file has no room for a card: it goes beside it, as OUT.README.md.
        card(Path(out).parent, filename=Path(out).with_suffix(".README.md").name)
    else:
        raise LlamaforgeError(f"unknown export format {to!r} (hf, gguf)")
    return Path(out)

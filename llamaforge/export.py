"""`llamaforge export`: read any supported checkpoint, write it as an HF directory or a GGUF file."""
from __future__ import annotations

from pathlib import Path

from .errors import LlamaforgeError
from .formats import gguf, hf
from .formats.load import load_checkpoint, load_classifier, parse_dtype
from .formats.paths import classifier_labels, resolve_model_path
from .provenance.modelcard import HF_LICENSE_TAGS, base_terms, licence_warnings, warn, write_model_card


def export(model: str, to: str, out: str, dtype: str = "fp32", quant: str = "F32", license: str | None = None) -> Path:
    """Write `model` as an HF directory (with a model card) or a GGUF file (its card beside it,
    OUT.README.md). A classification run becomes an HF LlamaForSequenceClassification directory,
    its LoRA folded in. license: the licence tag to give the output (default: the source's); a tag
    that contradicts the source's terms is warned about before anything is written."""
    if to not in ("hf", "gguf"):
        raise LlamaforgeError(f"unknown export format {to!r} (hf, gguf)")
    terms = base_terms(model)
    warn(licence_warnings(terms, out, license))

    def card(d, filename="README.md"):
        write_model_card(d, recipe="export", title=f"{Path(out).name} (exported by llamaforge)", base_model=model,
                         config={"model": model, "to": to, "dtype": dtype, "quant": quant}, data=[], metrics={},
                         license_tag=license, terms=terms, filename=filename)

    source = resolve_model_path(model)
    if classifier_labels(source) is not None:   # a classification run: the Llama with its score head
        if to != "hf":
            raise LlamaforgeError(f"{model}: a classifier's score head has no place in a {to} file, which llama.cpp "
                                  f"reads as a language model; export it --to hf (LlamaForSequenceClassification)")
        ckpt, score, labels = load_classifier(source)
        hf.save(ckpt, out, dtype=parse_dtype(dtype), extra=card,
                writer=lambda c, d, dt: hf.write_classifier(c, score, labels, d, dt))
        return Path(out)
    ckpt = load_checkpoint(model)
    if ckpt.prefix is not None:
        raise LlamaforgeError(f"{model}: a prefix-tuned model has no place for its prefix in {to} files; "
                              f"use it as it is, or fine-tune with --method lora or full to export")
    if to == "hf":
        hf.save(ckpt, out, dtype=parse_dtype(dtype), extra=card)
        return Path(out)
    if Path(out).exists():
        raise LlamaforgeError(f"{out}: exists")
    lid = terms["license"]["id"] if terms else None
    tag = license or (HF_LICENSE_TAGS.get(lid, lid) if lid else None)
    if tag:   # the file itself says its licence, whatever format the source was in
        ckpt.metadata["license"] = {"general.license": tag}
    gguf.save(ckpt, out, qtype=quant)
    # A single file has no room for a card: it goes beside it, as OUT.README.md.
    card(Path(out).parent, filename=Path(out).with_suffix(".README.md").name)
    return Path(out)

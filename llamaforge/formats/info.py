"""`llamaforge info`: what a checkpoint is, from its config and metadata."""
from __future__ import annotations

from .load import load_checkpoint


def model_info(model: str = "default") -> dict:
    ckpt = load_checkpoint(model)
    c, tok, meta = ckpt.config, ckpt.tokenizer, ckpt.metadata
    n_params = sum(t.numel() for t in ckpt.state_dict.values())
    return {
        "path": meta.get("path"),
        "format": meta.get("format"),
        "name": meta.get("name"),
        "architecture": "llama",
        "parameters": n_params,
        "layers": c.n_layers, "hidden_size": c.dim, "heads": c.n_heads, "kv_heads": c.n_kv_heads,
        "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
        "context_length": c.max_seq_len,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
        "tied_embeddings": c.tie_embeddings,
        "stored_as": meta.get("quantization"),
        "tokenizer": {"kind": "byte-level BPE" if tok.kind == "bpe" else "SentencePiece BPE",
                      "vocab_size": tok.vocab_size, "bos": tok.bos_token, "eos": tok.eos_token},
        "chat_template": tok.chat_template is not None,
        "license": meta.get("license") or None,
        "adapter": {"type": meta["adapter_type"], "path": meta["adapter"]} if "adapter" in meta else None,
    }


def format_info(info: dict) -> str:
    def human(n):
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"

    tk = info["tokenizer"]
    lic = info["license"]
    lines = [
        f"model            {info['name']}",
        f"path             {info['path']} ({info['format']})",
        f"architecture     {info['architecture']}: {info['layers']} layers, hidden {info['hidden_size']}, "
        f"{info['heads']} heads / {info['kv_heads']} kv heads, MLP {info['intermediate_size']}",
        f"parameters       {human(info['parameters'])} ({info['parameters']:,})",
        f"context length   {info['context_length']} (rope theta {info['rope_theta']:g}"
        + (f", llama3 scaling x{info['rope_scaling']['factor']:g}" if info["rope_scaling"] else "") + ")",
        f"embeddings       {'tied' if info['tied_embeddings'] else 'untied'}",
        f"stored as        {info['stored_as']}",
        f"tokenizer        {tk['kind']}, {tk['vocab_size']} tokens, bos {tk['bos']!r}, eos {tk['eos']!r}",
        f"chat template    {'yes' if info['chat_template'] else 'no'}",
        "license          " + (", ".join(f"{k} = {v}" for k, v in lic.items()) if lic else "none found in the metadata"),
    ]
    if info.get("adapter"):   # a fine-tuned run: the base model above, with this adapter applied
        lines.insert(2, f"adapter          {info['adapter']['type']}, {info['adapter']['path']}")
    return "\n".join(lines)

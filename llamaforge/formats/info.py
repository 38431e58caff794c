"""`llamaforge info`: what a checkpoint is, from its config and metadata. Headers only: the
weights are never read, so a 7B model answers as fast as a small one."""
from __future__ import annotations

from ..files import read_yaml
from .load import load_checkpoint
from .paths import adapter_config, classifier_labels, model_kind, resolve_model_path, run_model_path


def model_info(model: str = "default") -> dict:
    path = resolve_model_path(model)
    labels = classifier_labels(path)
    if labels is not None:
        return classifier_info(path, labels)
    ckpt = load_checkpoint(path, weights=False)
    c, tok, meta = ckpt.config, ckpt.tokenizer, ckpt.metadata
    n_params = sum(t.numel() for t in ckpt.state_dict.values())
    return {
        "path": meta.get("path"),
        "format": meta.get("format"),
        "name": meta.get("name"),
        "architecture": c.arch,
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
        "classifier": None,
    }


def classifier_info(run, labels: list[str]) -> dict:
    """A classification run: its base model (or, full fine-tuned, its own weights), the score head
    on the last token's hidden state, the labels, and the LoRA adapter it trained."""
    best = run_model_path(run)
    lora = model_kind(best) == "adapter"
    base = read_yaml(run / "config.yaml").get("model") or "default"
    info = model_info(base if lora else best)
    info.update(path=str(run), format="run", architecture="llama (sequence classification)",
                classifier={"labels": labels, "method": "lora" if lora else "full",
                            "head": f"score: {info['hidden_size']} -> {len(labels)}, on the last token"})
    info["parameters"] += info["hidden_size"] * len(labels)
    if lora:
        raw = adapter_config(best)[2]
        info["adapter"] = {"type": "lora", "path": str(best), "rank": raw.get("r"), "alpha": raw.get("lora_alpha"),
                           "targets": raw.get("target_modules"), "base": base}
    return info


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
        a = info["adapter"]
        shape = f", rank {a['rank']} (alpha {a['alpha']:g}) on {', '.join(a['targets'])}" if a.get("rank") else ""
        lines.insert(2, f"adapter          {a['type']}{shape}, {a['path']}")
    if info.get("classifier"):
        k = info["classifier"]
        lines.insert(2, f"classifier       {k['method']} fine-tuning; {k['head']}; "
                        f"{len(k['labels'])} labels: {', '.join(k['labels'])}")
    return "\n".join(lines)

"""Meta's original format: params.json, consolidated.NN.pth (one per model-parallel shard) and a
SentencePiece tokenizer.model. Q/K rows interleave RoPE pairs, as in GGUF."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import LlamaforgeError
from ..files import atomic_output_dir, read_json, write_json
from ..model.config import LlamaConfig
from ..text.convert import from_sentencepiece_model, from_tiktoken_model, is_tiktoken_file
from .checkpoint import Checkpoint, check_shapes, stored_dtypes
from .gguf import permute_qk, unpermute_qk

# Meta name (after "layers.N.") -> ours, and the dim along which model-parallel shards concatenate
# (None: replicated in every shard).
_BLOCK = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0), "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0), "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0), "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None), "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_GLOBAL = {"tok_embeddings.weight": ("embed_tokens.weight", 1), "norm.weight": ("norm.weight", None),
           "output.weight": ("lm_head.weight", 0)}


def _split_name(name: str):
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        if rest in _BLOCK:
            ours, dim = _BLOCK[rest]
            return f"layers.{i}.{ours}", dim
    elif name in _GLOBAL:
        return _GLOBAL[name]
    return None, None


def family_context(params: dict) -> int:
    """The context length of a Meta release whose params.json does not say it (Llama 1 and 2 do
    not), told apart by what they do say: Llama 3.1 / 3.2 scale RoPE (128k), Llama 3 has theta
    500000 (8k), Code Llama 1e6 (16k), Llama 2 norm_eps 1e-5 (4k), LLaMA 1 1e-6 (2k)."""
    if params.get("use_scaled_rope"):
        return 131072
    theta, eps = float(params.get("rope_theta", 10000.0)), float(params.get("norm_eps", 1e-5))
    if theta == 500000.0:
        return 8192
    if theta == 1e6:
        return 16384
    return 4096 if eps >= 1e-5 else 2048


def load(path: Path, dtype: torch.dtype | None = None, weights: bool = True) -> Checkpoint:
    """weights=False: params, tokenizer and tensor shapes only (meta tensors, for `info`)."""
    params = read_json(path / "params.json")
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise LlamaforgeError(f"{path}: no consolidated.*.pth weights")
    if not (path / "tokenizer.model").exists():
        raise LlamaforgeError(f"{path}: no tokenizer.model")
    parts = []
    for f in shards:
        try:
            # weights_only: never unpickle arbitrary objects from a file we did not write.
            parts.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise LlamaforgeError(f"{f}: unreadable PyTorch weights ({str(e).splitlines()[0]})") from None
    state = {}
    for name in parts[0]:
        ours, dim = _split_name(name)
        if ours is None:
            if name.startswith("rope.freqs"):
                continue  # Llama 1 checkpoints store the RoPE table; we compute it
            raise LlamaforgeError(f"{shards[0]}: unexpected tensor {name}")
        tensors = [p[name] if weights else p[name].to("meta") for p in parts]   # mmap: shapes read only
        # Llama 1/2 split the embedding along its columns; Llama 3 along its rows.
        if ours == "embed_tokens.weight" and len(parts) > 1 and tensors[0].shape[1] == params.get("dim"):
            dim = 0
        t = tensors[0] if dim is None or len(parts) == 1 else torch.cat(tensors, dim=dim)
        state[ours] = t.to(dtype) if dtype is not None else t
    try:
        dim, n_heads = params["dim"], params["n_heads"]
        config = LlamaConfig(
            vocab_size=state["embed_tokens.weight"].shape[0], dim=dim, n_layers=params["n_layers"],
            n_heads=n_heads, n_kv_heads=params.get("n_kv_heads") or n_heads,
            intermediate_size=state["layers.0.mlp.gate_proj.weight"].shape[0],
            norm_eps=params.get("norm_eps", 1e-5), rope_theta=float(params.get("rope_theta", 10000.0)),
            max_seq_len=params.get("max_seq_len") or family_context(params),
            tie_embeddings="lm_head.weight" not in state,
            rope_scaling=dict(factor=float(params.get("rope_scaling_factor", 8.0)), low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=8192)
            if params.get("use_scaled_rope") else None)
    except KeyError as e:
        raise LlamaforgeError(f"{path / 'params.json'}: missing field {e.args[0]}") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise LlamaforgeError(f"{path / 'params.json'}: {e}") from None
    check_shapes(state, config, path)   # before the Q/K permutation, which needs the right shapes
    for name in list(state):
        if name.endswith("q_proj.weight"):
            state[name] = unpermute_qk(state[name], config.n_heads)
        elif name.endswith("k_proj.weight"):
            state[name] = unpermute_qk(state[name], config.n_kv_heads)
    if is_tiktoken_file(path / "tokenizer.model"):   # Llama 3 and later
        tokenizer = from_tiktoken_model(path / "tokenizer.model", params.get("vocab_size"),
                                        llama31=bool(params.get("use_scaled_rope")))
    else:
        tokenizer = from_sentencepiece_model(path / "tokenizer.model")
    metadata = {"name": path.name, "license": None,
                "quantization": stored_dtypes(state)}
    return Checkpoint(config, state, tokenizer, metadata)


def save(ckpt: Checkpoint, out_dir, tokenizer_model: str | Path):
    """Write a single-shard Meta directory. tokenizer_model: the SentencePiece file to copy."""
    c = ckpt.config
    inverse = {ours: meta for meta, (ours, _) in _BLOCK.items()}
    with atomic_output_dir(out_dir) as tmp:
        state = {}
        for name, t in ckpt.state_dict.items():
            if name.endswith("q_proj.weight"):
                t = permute_qk(t, c.n_heads)
            elif name.endswith("k_proj.weight"):
                t = permute_qk(t, c.n_kv_heads)
            if name.startswith("layers."):
                _, i, rest = name.split(".", 2)
                meta_name = f"layers.{i}.{inverse[rest]}"
            else:
                meta_name = {ours: m for m, (ours, _) in _GLOBAL.items()}[name]
            state[meta_name] = t.detach().clone().contiguous()
        torch.save(state, tmp / "consolidated.00.pth")
        params = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
                  "vocab_size": c.vocab_size, "norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
                  "max_seq_len": c.max_seq_len}
        if c.rope_scaling:
            params.update(use_scaled_rope=True, rope_scaling_factor=c.rope_scaling["factor"])
        write_json(tmp / "params.json", params)
        shutil.copy(tokenizer_model, tmp / "tokenizer.model")

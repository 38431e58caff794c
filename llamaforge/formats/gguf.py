"""GGUF (llama.cpp) in and out.

Reading uses a small header parser of our own and the `gguf` package's dequantisers: the
package's `GGUFReader` builds a numpy view per vocabulary entry and takes ~3 s on SmolLM2's
49k-token vocabulary, while parsing the header directly takes well under 0.1 s.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..errors import LlamaforgeError
from ..files import atomic_path
from ..model.config import LlamaConfig
from ..model.llama import rope_inv_freq
from ..text.convert import TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN, byte_level_bpe, sentencepiece_bpe
from ..text.pretokenizers import pre_tokenizer_name
from ..text.tokenizer import Tokenizer
from .checkpoint import Checkpoint, expected_shapes
from .gguf_header import read_gguf

# GGUF tensor name -> our parameter name (per block, then global).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def _dequantize(buf, shape, qtype, start, nbytes, path, name) -> torch.Tensor:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start)
    if qtype in _TORCH_DEQUANT:
        return _TORCH_DEQUANT[qtype](torch.from_numpy(raw.copy()).view(-1, _BLOCK_BYTES[qtype])).reshape(shape)
    if qtype == Q.F32:
        arr = raw.view(np.float32)
    elif qtype == Q.F16:
        arr = raw.view(np.float16)
    elif qtype == Q.BF16:
        return torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(shape)
    else:
        try:
            arr = quants.dequantize(raw.reshape(shape[:-1] + (-1,)), qtype)
        except NotImplementedError:
            raise LlamaforgeError(f"{path}: tensor {name}: quantisation type {qtype.name} "
                                  "cannot be dequantised by the gguf package") from None
    return torch.from_numpy(np.array(arr).reshape(shape))


# The common llama.cpp block formats, dequantised with torch (multi-threaded) instead of numpy:
# 0.2 s instead of 1.4 s for SmolLM2's Q4_1 file. Same fp32 arithmetic as the gguf package, so the
# results are bit-identical (the GGUF tests compare them).
def _scale(blocks, at=0):
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()        # (n_blocks, 1)


def _nibbles(packed):
    # 16 bytes hold 32 values: low nibbles are values 0-15, high nibbles values 16-31.
    return torch.cat([packed & 0x0F, packed >> 4], dim=1).float()


def _dequant_q8_0(b):   # 34 bytes: f16 scale, 32 x int8
    return (_scale(b) * b[:, 2:].contiguous().view(torch.int8).float()).flatten()


def _dequant_q4_0(b):   # 18 bytes: f16 scale, 32 x 4-bit, offset 8
    return (_scale(b) * (_nibbles(b[:, 2:]) - 8)).flatten()


def _dequant_q4_1(b):   # 20 bytes: f16 scale, f16 min, 32 x 4-bit
    return (_scale(b) * _nibbles(b[:, 4:]) + _scale(b, 2)).flatten()


def _torch_dequantizers():
    from gguf import GGMLQuantizationType as Q
    return {Q.Q8_0: _dequant_q8_0, Q.Q4_0: _dequant_q4_0, Q.Q4_1: _dequant_q4_1}, {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}


_TORCH_DEQUANT, _BLOCK_BYTES = _torch_dequantizers()


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores Q/K rows with RoPE pairs interleaved (Meta's layout); ours pairs i with
    i + head_dim/2. Undo the permutation its converter applies to llama-architecture models."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `unpermute_qk`: our layout -> llama.cpp's."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# GGUF architectures read: llama (also what Mistral, Yi and DeepSeek LLM files are written as) and
# qwen2 (q/k/v biases; llama.cpp's converter leaves its Q/K rows unpermuted).
GGUF_ARCHS = ("llama", "qwen2")


def config_from_metadata(meta: dict, tensors: dict, path: Path) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise LlamaforgeError(f"{path}: unsupported architecture {arch!r} (llamaforge reads {', '.join(GGUF_ARCHS)})")

    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise LlamaforgeError(f"{path}: missing metadata {arch}.{key}")
        return v

    if "token_embd.weight" not in tensors:
        raise LlamaforgeError(f"{path}: missing tensor token_embd.weight")
    vocab = tensors["token_embd.weight"][0][0]
    dim, n_heads = get("embedding_length"), get("attention.head_count")
    try:
        return _config(meta, tensors, vocab, dim, n_heads, get)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise LlamaforgeError(f"{path}: {e}") from None


def _config(meta, tensors, vocab, dim, n_heads, get) -> LlamaConfig:
    qwen2 = meta.get("general.architecture") == "qwen2"
    context = get("context_length", 2048)
    # A window is Mistral's (llama.cpp writes Mistral as llama); one as long as the context is none.
    window = None if qwen2 else meta.get("llama.attention.sliding_window")
    window = window if window and window < context else None
    return LlamaConfig(
        vocab_size=vocab, dim=dim, n_layers=get("block_count"), n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads),
        intermediate_size=get("feed_forward_length"),
        head_dim=get("attention.key_length", dim // n_heads),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_seq_len=context,
        tie_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_output.bias" in tensors or (not qwen2 and "blk.0.attn_q.bias" in tensors),
        qkv_bias=qwen2, arch="qwen2" if qwen2 else "mistral" if window else "llama", sliding_window=window,
    )


def rope_freq_divisors(cfg: LlamaConfig) -> torch.Tensor:
    """What llama.cpp's `rope_freqs` holds: plain RoPE frequencies over the scaled ones."""
    return (rope_inv_freq(replace(cfg, rope_scaling=None)) / rope_inv_freq(cfg)).float()


# Our own metadata keys for Llama-3 scaling parameters (llama.cpp keeps only the rope_freqs tensor).
_SCALING_KEY = "llamaforge.rope_scaling"


def _rope_scaling_from_freqs(freqs: torch.Tensor, cfg: LlamaConfig, meta: dict, path: Path) -> dict:
    """llama.cpp bakes Llama-3.1 scaling into a `rope_freqs` tensor of per-frequency divisors.
    Recover the HF parameters (from our metadata if we wrote the file; otherwise the factor from
    the tensor and Meta's published defaults for the rest) and check they reproduce it."""
    scaling = dict(factor=float(freqs.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    for key in scaling:
        if f"{_SCALING_KEY}.{key}" in meta:
            scaling[key] = type(scaling[key])(meta[f"{_SCALING_KEY}.{key}"])
    if not torch.allclose(rope_freq_divisors(replace(cfg, rope_scaling=scaling)), freqs.float(), rtol=1e-3):
        raise LlamaforgeError(f"{path}: rope_freqs tensor does not match Llama-3 frequency scaling")
    return scaling


def tokenizer_from_metadata(meta: dict, path: Path) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise LlamaforgeError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type")
    for key in ("token_type", "scores"):
        values = meta.get(f"tokenizer.ggml.{key}")
        if values is not None and len(values) != len(tokens):
            raise LlamaforgeError(f"{path}: tokenizer.ggml.{key} has {len(values)} entries for {len(tokens)} tokens")
    try:
        return _tokenizer(meta, kind, tokens, types, path)
    except LlamaforgeError:
        raise
    except Exception as e:   # the tokenizers library rejects inconsistent vocabularies and merges
        raise LlamaforgeError(f"{path}: unusable tokenizer metadata ({str(e).splitlines()[0]})") from None


def _tokenizer(meta, kind, tokens, types, path) -> Tokenizer:
    if kind == "gpt2":
        backend = byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges", []), types,
                                 meta.get("tokenizer.ggml.pre"), source=str(path))
        tk_kind, add_bos_default = "bpe", False
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise LlamaforgeError(f"{path}: SentencePiece tokenizer without tokenizer.ggml.scores")
        backend = sentencepiece_bpe(tokens, scores, types, meta.get("tokenizer.ggml.add_space_prefix", True))
        tk_kind, add_bos_default = "sentencepiece", True  # llama.cpp's default for this kind
    else:
        raise LlamaforgeError(f"{path}: unsupported tokenizer model {kind!r} (supported: gpt2, llama)")

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    extra = [meta[f"tokenizer.ggml.{k}"] for k in ("eot_token_id", "eom_token_id") if f"tokenizer.ggml.{k}" in meta]
    return Tokenizer(backend, kind=tk_kind, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
                     pad_token=token("padding_token_id"), unk_token=token("unknown_token_id"),
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
                     chat_template=meta.get("tokenizer.chat_template"), extra_eos_ids=extra)


def _our_name(gguf_name: str, path: Path) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK_NAMES:
        return f"layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise LlamaforgeError(f"{path}: unexpected tensor {gguf_name}")


def load(path: Path, dtype: torch.dtype | None = None, weights: bool = True) -> Checkpoint:
    """weights=False: the header only, tensors as shapes on the meta device (for `info`)."""
    meta, tensors, buf = read_gguf(path)
    cfg = config_from_metadata(meta, tensors, path)
    permuted = meta.get("general.architecture") == "llama"   # (also Mistral's files; qwen2's are not)
    state = {}
    expected = expected_shapes(cfg)
    for name, (shape, qtype, start, nbytes) in tensors.items():
        if name == "rope_freqs.weight":
            w = _dequantize(buf, shape, qtype, start, nbytes, path, name)
            cfg.rope_scaling = _rope_scaling_from_freqs(w, cfg, meta, path)
            continue
        ours = _our_name(name, path)
        if expected.get(ours, shape) != shape:   # before the Q/K permutation, which needs it
            raise LlamaforgeError(f"{path}: tensor {ours} has shape {shape}, expected {expected[ours]}")
        if not weights:
            state[ours] = torch.empty(shape, dtype=dtype or torch.float32, device="meta")
            continue
        w = _dequantize(buf, shape, qtype, start, nbytes, path, name)
        if permuted and ".q_proj." in ours:
            w = unpermute_qk(w, cfg.n_heads)
        elif permuted and ".k_proj." in ours:
            w = unpermute_qk(w, cfg.n_kv_heads)
        state[ours] = w.to(dtype) if dtype is not None else w
    from collections import Counter
    types = Counter(t[1].name for t in tensors.values())
    metadata = {
        "name": meta.get("general.name"),
        "license": {k: meta[k] for k in meta if k.startswith("general.license")} or None,
        "quantization": ", ".join(f"{n} {k}" for k, n in types.most_common()),
        # Storage type of the transformer's linear weights (the bulk of the bytes), if all alike.
        "linear_weight_type": _single_type(tensors, ("attn_q", "attn_k", "attn_v", "attn_output",
                                                     "ffn_gate", "ffn_up", "ffn_down")),
        "gguf_metadata": {k: v for k, v in meta.items() if not k.startswith("tokenizer.ggml.")},
    }
    return Checkpoint(cfg, state, tokenizer_from_metadata(meta, path), metadata)


def _single_type(tensors: dict, kinds: tuple[str, ...]) -> str | None:
    found = {info[1].name for name, info in tensors.items()
             if name.startswith("blk.") and name.split(".")[2] in kinds and name.endswith(".weight")}
    return found.pop() if len(found) == 1 else None


# --- writing -----------------------------------------------------------------------------------

# What the gguf package can quantise to (it reads more: K- and i-quants).
WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4", "TQ1_0", "TQ2_0")

def save(ckpt: Checkpoint, out_path: str | Path, qtype: str = "F32"):
    """Write a llama-architecture GGUF. Norms stay F32; 2-D weights use `qtype` where their row
    length fits its block size (llama.cpp's converter makes the same exceptions)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    out_path = Path(out_path)
    cfg, tok = ckpt.config, ckpt.tokenizer
    if qtype.upper() not in WRITABLE_TYPES:
        raise LlamaforgeError(f"cannot write GGUF tensors as {qtype!r}; choose one of {', '.join(WRITABLE_TYPES)}")
    qt = Q[qtype.upper()]
    # Qwen2 as qwen2; Mistral as llama, as llama.cpp's converter writes it.
    arch = "qwen2" if cfg.arch == "qwen2" else "llama"
    if cfg.qkv_bias and arch != "qwen2":
        raise LlamaforgeError(f"{out_path}: q/k/v biases without an o bias are qwen2's; this {cfg.arch} model "
                              f"cannot be written as GGUF: export it --to hf")
    if tok.kind == "bpe" and pre_tokenizer_name(tok.backend.to_str()) is None:
        # llama.cpp (and llamaforge) would read the file with another split: other ids, same text.
        raise LlamaforgeError(f"{out_path}: the tokenizer splits text in a way no GGUF pre-tokenizer name "
                              f"(tokenizer.ggml.pre) describes; export to HF (--to hf) to keep it")
    with atomic_path(out_path) as tmp:   # never a half-written file
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(ckpt.metadata.get("name") or "llamaforge model")
        lic = (ckpt.metadata.get("license") or {}).get("general.license")
        if lic:
            w.add_license(lic)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        if cfg.sliding_window:
            w.add_sliding_window(cfg.sliding_window)
        w.add_vocab_size(cfg.vocab_size)
        file_type = gguf.LlamaFileType.ALL_F32 if qt == Q.F32 else getattr(gguf.LlamaFileType, f"MOSTLY_{qt.name}", None)
        if file_type is not None:
            w.add_file_type(file_type)
        _write_tokenizer(w, tok)

        inverse = {v: k for k, v in _BLOCK_NAMES.items()}
        inverse_global = {v: k for k, v in _GLOBAL_NAMES.items()}
        if cfg.rope_scaling:
            w.add_tensor("rope_freqs.weight", rope_freq_divisors(cfg).numpy())
            for key, value in cfg.rope_scaling.items():
                (w.add_uint32 if isinstance(value, int) else w.add_float32)(f"{_SCALING_KEY}.{key}", value)
        for name, t in ckpt.state_dict.items():
            parts = name.split(".")
            if parts[0] == "layers":
                gname = f"blk.{parts[1]}.{inverse['.'.join(parts[2:-1])]}.{parts[-1]}"
            else:
                gname = f"{inverse_global[parts[0]]}.{parts[-1]}"
            t = t.detach().float()
            if arch == "llama" and ".q_proj." in name:
                t = permute_qk(t, cfg.n_heads)
            elif arch == "llama" and ".k_proj." in name:
                t = permute_qk(t, cfg.n_kv_heads)
            arr = t.numpy()
            block = gguf.GGML_QUANT_SIZES[qt][0]
            this_qt = qt if arr.ndim == 2 and arr.shape[-1] % block == 0 else Q.F32
            if this_qt == Q.F32:
                w.add_tensor(gname, arr)
            else:
                w.add_tensor(gname, gguf.quants.quantize(arr, this_qt), raw_dtype=this_qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def _write_tokenizer(w, tok: Tokenizer):
    import json as _json

    spec = _json.loads(tok.backend.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    for added in spec.get("added_tokens", []):
        if added["id"] >= len(tokens):
            tokens.extend([None] * (added["id"] + 1 - len(tokens)))
        tokens[added["id"]] = added["content"]
    special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    types = []
    for t in tokens:
        if t == tok.unk_token:
            types.append(TOKEN_UNKNOWN)
        elif t in special:
            types.append(TOKEN_CONTROL)
        elif tok.kind == "sentencepiece" and t.startswith("<0x") and len(t) == 6:
            types.append(TOKEN_BYTE)
        else:
            types.append(TOKEN_NORMAL)
    if tok.kind == "sentencepiece":
        w.add_tokenizer_model("llama")
        # Merges were derived from scores; a piece's rank is its merge order, so scores are -rank.
        ranks: dict[str, int] = {}
        for r, m in enumerate(spec["model"]["merges"]):
            ranks.setdefault("".join(m.split(" ") if isinstance(m, str) else m), r)
        w.add_token_scores([-float(ranks.get(t, 0 if types[i] != TOKEN_NORMAL else len(ranks)))
                            for i, t in enumerate(tokens)])
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_tokenizer_name(tok.backend.to_str()))
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, token in (("bos", tok.bos_token), ("eos", tok.eos_token), ("unk", tok.unk_token),
                       ("pad", tok.pad_token)):
        tid = tok.token_id(token)
        if tid is not None:
            getattr(w, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                        "pad": "add_pad_token_id"}[key])(tid)
    w.add_add_bos_token(tok.add_bos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)

"""The `Checkpoint` every format reads into and writes from: a `LlamaConfig`, a state dict in
`model.llama.Llama`'s parameter names and layouts, a `Tokenizer` and the metadata found on the way
(name, licence, stored dtype or quantisation); and the checks that its tensors fit its config."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LlamaforgeError
from ..model.config import LlamaConfig
from ..text.tokenizer import Tokenizer

if TYPE_CHECKING:   # torch is imported where tensors are made, so metadata-only readers start fast
    import torch


@dataclass
class Checkpoint:
    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    metadata: dict = field(default_factory=dict)   # format, path, name, license, quantization ...
    prefix: dict[str, torch.Tensor] | None = None  # prefix-tuning keys/values (adapters.add_prefix)


def expected_shapes(config: LlamaConfig) -> dict[str, tuple]:
    c = config
    shapes = {"embed_tokens.weight": (c.vocab_size, c.dim), "norm.weight": (c.dim,)}
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c.dim,), p + "post_attention_layernorm.weight": (c.dim,),
            p + "self_attn.q_proj.weight": (q, c.dim), p + "self_attn.k_proj.weight": (kv, c.dim),
            p + "self_attn.v_proj.weight": (kv, c.dim), p + "self_attn.o_proj.weight": (c.dim, q),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.dim),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.dim),
            p + "mlp.down_proj.weight": (c.dim, c.intermediate_size),
        })
        if c.attention_bias or c.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if c.attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (c.dim,)
    return shapes


def stored_dtypes(state: dict[str, torch.Tensor]) -> str:
    """The dtypes a checkpoint stores its tensors in, e.g. "bfloat16" or "bfloat16, float32"."""
    return ", ".join(sorted({str(t.dtype).replace("torch.", "") for t in state.values()}))


def check_shapes(state: dict, config: LlamaConfig, path: Path):
    """Each tensor present has the shape the config implies."""
    expected = expected_shapes(config)
    for name, t in state.items():
        if name in expected and tuple(t.shape) != expected[name]:
            raise LlamaforgeError(f"{path}: tensor {name} has shape {tuple(t.shape)}, expected {expected[name]}")


def check_state_dict(ckpt: Checkpoint, path: Path):
    """Every tensor present with the shape the config implies, and nothing unexplained."""
    expected = expected_shapes(ckpt.config)
    check_shapes(ckpt.state_dict, ckpt.config, path)
    for name in expected:
        if name not in ckpt.state_dict:
            raise LlamaforgeError(f"{path}: missing tensor {name}")
    extra = sorted(set(ckpt.state_dict) - set(expected))
    if extra:
        raise LlamaforgeError(f"{path}: unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))

"""The Llama transformer in plain PyTorch.

Covers Llama 1/2/3/3.1/3.2, TinyLlama, SmolLM/SmolLM2 and OpenLLaMA: RMSNorm, RoPE (with
`rope_theta` and Llama-3 frequency scaling), grouped-query attention through
`scaled_dot_product_attention`, a SwiGLU MLP, tied or untied embeddings and a static KV cache.

Parameter names follow Hugging Face's `LlamaForCausalLM` without its `model.` prefix, and Q/K rows
are in HF's "rotate half" layout, so an HF state dict loads with a prefix strip and nothing else.
"""
from __future__ import annotations

import math
from functools import cache, lru_cache, partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import LlamaforgeError
from .config import LlamaConfig
from .device import cpu_flags_have


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight, accumulated in fp32 by PyTorch's fused kernel: equal
        # to the reference's op-by-op version in fp32 and bf16 alike, and fewer ops per token.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + update, its norm): the residual stream after a sublayer and the next one's input
        (one kernel on a CPU in inference: `kernels.KernelRMSNorm`)."""
        x = x + update
        return x, self(x)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,), fp32, with Llama-3 scaling applied when configured."""
    hd = config.head_dim
    # Always on the CPU, even while a model is being built on the meta device.
    arange = torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float()
    inv_freq = 1.0 / (config.rope_theta ** (arange / hd))
    s = config.rope_scaling
    if not s:
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T)."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def kernel_takes(t: torch.Tensor) -> bool:
    """Whether a CPU kernel hook with a backward of its own (MLP.swiglu, Attention.rope; set by
    kernels.use_cpu_training_kernels) may replace PyTorch's ops on t: bf16 on a CPU, nothing
    tracing (torch.compile fuses its own)."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and not torch.compiler.is_compiling()


def inference_kernel_takes(t: torch.Tensor) -> bool:
    """Whether a CPU kernel hook (Attention.rope and .prefill_attention, MLP.silu_mul; set by
    kernels.use_cpu_kernels) may replace PyTorch's ops on t: as kernel_takes, and no gradient to carry."""
    return kernel_takes(t) and not t.requires_grad


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # "Rotate half" pairs dimension i with i + head_dim/2 (HF layout; Meta and GGUF interleave
    # pairs instead, and their loaders permute Q/K rows into this layout).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Preallocated keys and values, (B, n_kv_heads, max_len, head_dim), filled in place."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class WindowKVCache(nn.Module):
    """A sliding-window model's cache for one sequence: the keys and values of the last `window`
    positions only, in a ring (position p in slot p % window), so its memory does not grow with
    the context. `update` returns the ring as it was, then the new keys; `positions` says where
    each of those sits (a slot not yet written: far in the past, outside every window)."""

    def __init__(self, batch_size: int, window: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, window, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.window = window

    def positions(self, start: int, T: int, device=None) -> torch.Tensor:
        W = self.window
        slots = torch.arange(W, device=device)
        held = start - 1 - (start - 1 - slots) % W                 # the latest position < start of each slot
        held = torch.where(held >= 0, held, -(2 ** 40))
        return torch.cat([held, torch.arange(start, start + T, device=device)])

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        T, W = k.shape[2], self.window
        keys, values = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        n = min(T, W)
        slots = torch.arange(start + T - n, start + T, device=k.device) % W
        self.k[:, :, slots], self.v[:, :, slots] = k[:, :, T - n:], v[:, :, T - n:]
        return keys, values


def attention_for_training(q, k, v, mask=None):
    """Causal attention as two matmuls and an fp32 softmax, for training.

    q (B, H, T, hd), k / v (B, Hkv, S, hd), mask boolean (B|1, 1, T, S) or None (causal). On a
    CPU, PyTorch's flash-attention backward is slow for the short sequences fine-tuning uses:
    forward + backward of one SmolLM2 layer in bf16 takes 7.9 ms at batch 16 x 24 tokens and 22.6
    ms at 8 x 128, against 1.7 and 10.4 ms here. The query heads that share a KV head are
    stacked as rows of one matrix, so K and V are never copied per head.
    """
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    scores = ((q * hd ** -0.5).reshape(B, Hkv, G * T, hd) @ k.transpose(-1, -2)).view(B, Hkv, G, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    else:
        mask = mask[:, :, None]                                              # (B|1, 1, 1, T, S)
    # An additive -inf bias, added in place to the fp32 copy: one pass over the scores, not three.
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=q.device).masked_fill_(~mask, float("-inf"))
    probs = scores.float().add_(bias).softmax(-1).to(q.dtype)
    return (probs.view(B, Hkv, G * T, S) @ v).view(B, H, T, hd)


BLOCKED_ATTENTION_MIN_LEN = 128


@cache
def sdpa_prefills_faster() -> bool:
    """Whether a bf16 prefill takes SDPA rather than causal_attention: on a CPU with AMX tiles,
    PyTorch's flash attention multiplies on them and is the faster (SmolLM2 layer on a 2-core
    Xeon: 256 new of 512 positions 0.63 vs 1.67 ms, 512 of 512 0.96 vs 2.49 ms); on AVX-512
    alone the blocked matmuls are (2.5 vs 4.5 ms at 512, on a 2-core EPYC). Where use_cpu_kernels
    has set Attention.prefill_attention (AMX with llamaforge's kernels), that kernel goes first."""
    return cpu_flags_have("amx_bf16")


def causal_attention(q, k, v, block: int = 64):
    """Causal attention for inference, in blocks of `block` queries; no mask.

    q (B, H, T, hd) are the last T of the S positions in k / v (B, Hkv, S, hd). Each block of
    queries multiplies only the keys it may see, so the matmuls skip about half of the masked
    upper triangle, and only the diagonal square needs a -inf bias. bf16 prefill of 512 tokens on
    a 2-core AVX-512 CPU: 2.5 ms per SmolLM2 layer, against 4.5 ms for PyTorch's CPU flash
    attention. The G query heads sharing a KV head are rows of one matrix, as in training,
    ordered (position, head) so that a block of positions is a contiguous slice. In fp32, and
    below BLOCKED_ATTENTION_MIN_LEN queries, SDPA is the faster (fp32 at 512: 4.9 vs 6.3 ms).
    """
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, offset = H // Hkv, S - T
    q = (q.transpose(1, 2) * hd ** -0.5).view(B, T, Hkv, G, hd).transpose(1, 2).contiguous()  # (B, Hkv, T, G, hd)
    out = torch.empty(B, T, Hkv, G, hd, dtype=q.dtype, device=q.device)
    # -inf above the diagonal; a shorter last block takes its top-left corner.
    diagonal = torch.full((block, block), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    for start in range(0, T, block):
        end = min(start + block, T)
        n, seen = end - start, offset + end
        scores = q[:, :, start:end].reshape(B, Hkv, n * G, hd) @ k[:, :, :seen].transpose(-1, -2)
        scores.view(B, Hkv, n, G, seen)[..., seen - n:].add_(diagonal[:n, :n, None].transpose(1, 2))
        probs = torch.softmax(scores, dim=-1)           # fp32 inside, whatever the input dtype
        out[:, start:end] = (probs @ v[:, :, :seen]).view(B, Hkv, n, G, hd).transpose(1, 2)
    return out.view(B, T, H, hd).transpose(1, 2)    # (B, H, T, hd), stored position-major


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        bias = config.attention_bias or config.qkv_bias   # Qwen2: q, k, v only
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=config.attention_bias)
        self.qkv_proj: nn.Module | None = None   # q, k and v stacked; see Llama.fuse_projections
        self.kv_cache: KVCache | None = None
        # Prefix-tuning: learned keys and values (2, n_kv_heads, P, head_dim) that every query sees
        # before the sequence; see adapters.add_prefix. They are not in the KV cache.
        self.prefix: nn.Parameter | None = None
        # A decode step's attention of one query per row over the whole cache, (q, k, v) -> y or
        # None: a CPU kernel set by kernels.use_cpu_kernels for inference; None: SDPA.
        self.decode_attention = None
        # RoPE of the first heads of rows, (x (B, T, >=heads, hd), cos, sin, heads) -> (B, T, heads,
        # hd), in one op: the stacked projection's q and k in inference, or q or k alone, forward
        # and backward, in training. A CPU kernel set by kernels.use_cpu_kernels and
        # use_cpu_training_kernels; None: apply_rope.
        self.rope = None
        # Causal attention of a prefill chunk (no mask), (q, k, v) -> y or None, for inference: the
        # AMX kernel set by kernels.use_cpu_kernels where the CPU has tiles; None: `torch_attention`.
        self.prefill_attention = None

    def with_prefix(self, k, v, mask, q_len: int):
        """Keys and values with the prefix in front, and the mask widened to match."""
        B, S, P = k.shape[0], k.shape[2], self.prefix.shape[2]
        if mask is None:
            mask = torch.ones(q_len, S, dtype=torch.bool, device=k.device).tril(S - q_len)[None, None]
        mask = torch.cat([mask.new_ones(*mask.shape[:-1], P), mask], dim=-1)
        pk, pv = (t[None].expand(B, -1, -1, -1).to(k.dtype) for t in self.prefix)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), mask

    def torch_attention(self, q, k, v, mask):
        """Attention of q (B, H, T, hd) over k, v (B, Hkv, S, hd) with PyTorch's ops: (B, H, T, hd)."""
        B, T = q.shape[0], q.shape[2]
        # Training attention also where a compiled training step reaches a layer whose q, k, v need no
        # gradient: the inference path's loop over the length would recompile for every length.
        # On a GPU, training takes SDPA below (its flash and memory-efficient kernels).
        if q.device.type == "cpu" and torch.is_grad_enabled() and (
                q.requires_grad or k.requires_grad or v.requires_grad or torch.compiler.is_compiling()):
            return attention_for_training(q, k, v, mask)
        if (mask is None and T >= BLOCKED_ATTENTION_MIN_LEN and q.device.type == "cpu"
                and q.dtype != torch.float32 and not sdpa_prefills_faster()):
            return causal_attention(q, k, v)
        if T == 1 and self.n_heads != self.n_kv_heads:
            # Decoding: the query heads sharing a KV head become that head's rows of queries, a
            # plain attention over (B, Hkv). Same result; bf16 SDPA with enable_gqa is 3-5x slower
            # here (74 us vs 22 us per layer at 128 cached positions on a 2-core AVX-512 CPU).
            return F.scaled_dot_product_attention(q.reshape(B, self.n_kv_heads, -1, self.head_dim), k, v,
                                                  attn_mask=mask).reshape(B, self.n_heads, 1, self.head_dim)
        S = k.shape[2]
        if mask is None and T > 1 and S > T:   # SDPA's causal flag would align queries to the first keys
            mask = causal_mask_after(T, S - T, S, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                              enable_gqa=self.n_heads != self.n_kv_heads)

    def forward(self, x, cos, sin, mask, cache_pos):
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_proj is None:
            q, k = self.q_proj(x).view(B, T, H, hd), self.k_proj(x).view(B, T, Hkv, hd)
            if self.rope is not None and kernel_takes(q) and kernel_takes(k) and cos.dtype == torch.bfloat16:
                q, k = self.rope(q, cos, sin, H).transpose(1, 2), self.rope(k, cos, sin, Hkv).transpose(1, 2)
            else:
                q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
            v = self.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)                    # (B, Hkv, T, hd)
        else:
            # One matmul for Q, K and V, and one RoPE call for Q and K together.
            qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, hd)                      # (B, T, H+2Hkv, hd)
            if self.rope is not None and inference_kernel_takes(qkv) and cos.dtype == torch.bfloat16:
                qk = self.rope(qkv, cos, sin, H + Hkv).transpose(1, 2)
            else:
                qk = apply_rope(qkv[:, :, :H + Hkv].transpose(1, 2), cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, :, H + Hkv:].transpose(1, 2)
        if self.kv_cache is not None and cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)                                # (B, Hkv, S, hd)
            if self.prefix is None and not torch.compiler.is_compiling():
                # A server's cache, whose rows have lengths of their own, attends itself: a decode
                # step's kernel, or each prompt's own keys in a prefill that packs several.
                attend = getattr(self.kv_cache, "attend", None)
                y = None
                if attend is not None:
                    y = attend(q, k, v, self.attention)
                elif T == 1 and mask is None and self.decode_attention is not None:
                    y = self.decode_attention(q, k, v)
                if y is not None:
                    return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        if self.prefix is not None:
            k, v, mask = self.with_prefix(k, v, mask, T)
        y = self.attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attention(self, q, k, v, mask):
        """Attention of q (B, H, T, hd), the last T of the S positions of k, v (B, Hkv, S, hd), causal
        where mask is None: the prefill kernel where it takes them, else `torch_attention`."""
        y = None
        if self.prefill_attention is not None and mask is None and q.shape[2] > 1 \
                and all(inference_kernel_takes(t) for t in (q, k, v)):
            y = self.prefill_attention(q, k, v)   # None where the kernel does not take these tensors
        return y if y is not None else self.torch_attention(q, k, v, mask)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=bias)
        self.gate_up_proj: nn.Module | None = None   # gate and up stacked; see Llama.fuse_projections
        # silu(gate) * up of the stacked projection's output in one op, for inference: a CPU
        # kernel set by kernels.use_cpu_kernels; None: chunk, silu and mul.
        self.silu_mul = None
        # silu(gate) * up of separate projections (training's), forward and backward each in one
        # pass: a CPU kernel set by kernels.use_cpu_training_kernels; None: silu and mul.
        self.swiglu = None

    def forward(self, x):
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
            if self.swiglu is not None and kernel_takes(gate) and kernel_takes(up):
                return self.down_proj(self.swiglu(gate, up))
        else:
            gate_up = self.gate_up_proj(x)
            if self.silu_mul is not None and inference_kernel_takes(gate_up):
                return self.down_proj(self.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)
        self.compile_training = False   # run training steps through compiled_block_forward

    def forward(self, x, cos, sin, mask, cache_pos):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos)
        x, h = self.post_attention_layernorm.add_and_norm(x, attended)
        return x + self.mlp(h)


_compiled_block_forward = None


def compiled_block_forward():
    """Block.forward through torch.compile, built once per process and shared by every block of
    every model (a block is an argument, not part of the compiled function, so copies of a model
    run their own weights)."""
    global _compiled_block_forward
    if _compiled_block_forward is None:
        _compiled_block_forward = torch.compile(Block.forward, dynamic=True)
    return _compiled_block_forward


def attention_mask(key_valid: torch.Tensor | None, q_len: int, cache_pos: int, kv_len: int, device=None):
    """Boolean SDPA mask (B or 1, 1, q_len, kv_len): causal, minus padded keys.

    Query i sits at cache slot cache_pos + i. It always sees itself, so a padded query row is never
    fully masked (a fully masked row gives NaN, which would then leak through the cached values).
    """
    device = key_valid.device if key_valid is not None else device
    q_idx = torch.arange(cache_pos, cache_pos + q_len, device=device)[:, None]
    k_idx = torch.arange(kv_len, device=device)[None, :]
    mask = (k_idx <= q_idx)[None, None]                                # (1, 1, T, S)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :kv_len]
        mask = mask | (k_idx == q_idx)[None, None]
    return mask


@lru_cache(maxsize=4)
def causal_mask_after(q_len: int, cache_pos: int, kv_len: int, device) -> torch.Tensor:
    """attention_mask(None, ...): a chunk of queries after cache_pos cached positions. Every layer
    of a forward asks for the same one (a server's prefill chunk after others: 30 masks
    built, ~2 ms), so the last few are kept."""
    return attention_mask(None, q_len, cache_pos, kv_len, device)


def sliding_window_mask(mask, window: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """`mask` (boolean (B|1, 1, T, S) or None: causal) narrowed to the window: a query at position
    p sees keys at positions p - window + 1 ... p. q_pos (B|1, T), k_pos (B|1, S)."""
    gap = q_pos[:, :, None] - k_pos[:, None, :]                                   # (B|1, T, S)
    band = ((gap >= 0) & (gap < window))[:, None]
    return band if mask is None else mask & band


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Tied models have no lm_head of their own: the output projection is the embedding matrix.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        # fp32 whatever the model dtype, and not a buffer, so `.to(bfloat16)` cannot round it.
        self.inv_freq = rope_inv_freq(config)
        # Token ids whose keys/values fill the KV cache's first slots (batch 1), kept by generation
        # so that a next prompt sharing that prefix need not recompute it; None when unknown.
        self.cache_tokens: list[int] | None = None
        self._fp32_output = (None, None)   # (weight's identity and version, its fp32 copy): `logits`
        self.checkpoint_blocks = False     # see gradient_checkpointing
        self.ran_compiled = False          # a forward ran the compiled training blocks (compile_for_training)
        # KVCache's int8 form, where keys and values are kept as int8: set by kernels.use_int8_kv_cache
        # (the class lives beside its kernels); None: in the model's dtype.
        self.int8_kv_cache: type | None = None

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def kv_int8(self) -> bool:
        """Whether keys and values are kept as int8 (kernels.use_int8_kv_cache)."""
        return self.int8_kv_cache is not None

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None):
        """Allocate a static KV cache of at least max_len positions in every layer.

        A cache that already fits is kept, so a compiled decode step sees the same buffers from
        one generation to the next (new buffers would cost a recompile). Attention only ever
        reads slots written in the current generation, so stale contents are harmless.
        """
        p = self.embed_tokens.weight
        dtype, device = dtype or p.dtype, device or p.device
        cache = self.layers[0].self_attn.kv_cache
        # A sliding window shorter than the generation: one sequence keeps only the window (a
        # padded batch keeps everything, its padding mask being one over the cache's slots).
        window = self.config.sliding_window
        ring = window is not None and window < max_len and batch_size == 1
        length = window if ring else max_len
        if self.kv_int8:
            if batch_size != 1:
                raise LlamaforgeError("--kv-cache int8 generates one prompt at a time")
            if not (isinstance(cache, self.int8_kv_cache) and cache.k.shape[2] >= max_len):
                self.cache_tokens = None
                for layer in self.layers:
                    layer.self_attn.kv_cache = self.int8_kv_cache(max_len, self.config.n_kv_heads, self.config.head_dim,
                                                                  device)
            return
        if (cache is not None and isinstance(cache, WindowKVCache) == ring and cache.k.shape[0] == batch_size
                and (cache.k.shape[2] == length if ring else cache.k.shape[2] >= max_len)
                and cache.k.dtype == dtype and cache.k.device == torch.device(device)):
            return
        self.cache_tokens = None
        kind = WindowKVCache if ring else KVCache
        for layer in self.layers:
            layer.self_attn.kv_cache = kind(batch_size, length, self.config.n_kv_heads, self.config.head_dim,
                                            dtype, device)

    def clear_cache(self):
        """Free what generation keeps: the KV cache and the fp32 output weight."""
        self.cache_tokens = None
        self._fp32_output = (None, None)
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    def hidden_states(self, input_ids, position_ids=None, mask=None, cache_pos=None):
        """Final normalised hidden states (B, T, dim).

        position_ids: (B, T), default cache_pos + arange(T). mask: boolean (B|1, 1, T, S), default
        causal. cache_pos: write keys/values to the KV cache from this slot (needs `setup_cache`),
        or a tensor for a server's cache, whose `update` takes it as it is: each row's own slot
        (B,) for one token per row, or each token's (T,) for prompts packed in one row.
        """
        B, T = input_ids.shape
        if position_ids is None:
            start = cache_pos or 0
            position_ids = torch.arange(start, start + T, device=input_ids.device)[None].expand(B, T)
        x = self.embed_tokens(input_ids)                                    # (B, T, dim)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        if self.config.sliding_window:
            mask = self._windowed(mask, position_ids, cache_pos, T)
        # A batch of one row or one position runs eager: the compiled graph's dynamic shapes would
        # be specialised to size 1 and compiled again, for one rare batch.
        compiled = torch.is_grad_enabled() and B > 1 and T > 1
        # Only a training step has activations to drop; a KV cache being filled is inference.
        checkpointed = self.checkpoint_blocks and self.training and torch.is_grad_enabled() and cache_pos is None
        for layer in self.layers:
            block = partial(compiled_block_forward(), layer) if compiled and layer.compile_training else layer
            if block is not layer:
                self.ran_compiled = True
            if checkpointed:
                # Non-reentrant: correct when x needs no gradient (LoRA on a frozen embedding) and
                # with parameters the block reaches through its module; the RNG state is
                # restored for the recomputation, so dropout draws the same masks.
                x = checkpoint(block, x, cos, sin, mask, cache_pos, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache_pos)
        return self.norm(x)

    def _windowed(self, mask, position_ids, cache_pos, T: int):
        """The mask with the sliding window applied, where the keys reach back further than it
        (otherwise the mask as it was, so the unmasked fast paths stay). Without a cache, keys
        are the queries (at their position ids, which also restart inside packed rows); with
        one, a key's position is its cache slot."""
        window, device = self.config.sliding_window, position_ids.device
        if cache_pos is None:
            if T <= window:
                return mask
            return sliding_window_mask(mask, window, position_ids, position_ids)
        cache = self.layers[0].self_attn.kv_cache
        if isinstance(cache, WindowKVCache) and isinstance(cache_pos, int):   # keys: the ring, then the new ones
            q_pos = torch.arange(cache_pos, cache_pos + T, device=device)[None]
            return sliding_window_mask(mask, window, q_pos, cache.positions(cache_pos, T, device)[None])
        if isinstance(cache_pos, int):
            S = cache_pos + T
            q_pos = torch.arange(cache_pos, S, device=device)[None]
        else:   # a server's: each row's one token at its own slot, or packed prompts' each token's
            S = int(cache_pos.max()) + 1
            q_pos = cache_pos[:, None]
        if S <= window:
            return mask
        return sliding_window_mask(mask, window, q_pos, torch.arange(S, device=device)[None])

    def forward(self, input_ids, position_ids=None, mask=None, cache_pos=None, last_only=False, fp32_logits=False):
        """Logits (B, T, vocab), or (B, 1, vocab) with last_only (prefill needs no more)."""
        h = self.hidden_states(input_ids, position_ids, mask, cache_pos)
        return self.logits(h[:, -1:] if last_only else h, fp32=fp32_logits)

    def logits(self, h: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """Output projection of hidden states (..., dim) to (..., vocab); a training loss calls it
        on the scored positions only, which on instruction data are a fraction of all.

        fp32=True (generation): fp32 logits whatever the model's dtype, the model's own weights
        times fp32 hidden states, summed in fp32, as llama.cpp computes them. In bf16 a logit near
        25 moves in steps of 0.125, so near-ties become exact ties that break by kernel order
        (SmolLM2 answers "The capital of France is Paris." or "L'Étoile, ..." by the CPU).
        The inference heads (`GemvLinear`, `Int8Linear`) sum in fp32 at no extra cost; a plain
        bf16 weight is multiplied as an fp32 copy, made once and kept while the weight stays."""
        head = self.lm_head
        if not fp32:
            return F.linear(h, self.embed_tokens.weight) if head is None else head(h)
        if head is None or isinstance(head, nn.Linear):
            return F.linear(h.float(), self._fp32_output_weight())
        return head(h.float())

    def _fp32_output_weight(self) -> torch.Tensor:
        """The output weight in fp32. Casting 49k x 576 bf16 weights takes ~0.1 s on 2 cores, more
        than a decode step, so the copy is kept until the weight changes (its version counter
        moves with every in-place update, e.g. a training step) or `clear_cache` drops it."""
        w = self.output_weight
        if w.dtype == torch.float32 or torch.compiler.is_compiling():
            return w.float()
        key = (w.data_ptr(), w._version)
        if self._fp32_output[0] != key:
            self._fp32_output = (key, w.detach().float())
        return self._fp32_output[1]

    def fuse_projections(self):
        """For inference: stack q/k/v_proj into one qkv_proj and gate/up_proj into gate_up_proj,
        so each block runs 2 input matmuls instead of 5 (decode ~15% faster on 2 cores, where
        per-call overhead is a large part of a step). The parameter names are then no longer
        HF's: fuse after loading, never before training or saving."""
        def stacked(*linears):
            bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
            fused = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=bias is not None,
                              device="meta")
            fused.weight = nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False)
            if bias is not None:
                fused.bias = nn.Parameter(bias, requires_grad=False)
            return fused

        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            a.qkv_proj = stacked(a.q_proj, a.k_proj, a.v_proj)
            a.q_proj = a.k_proj = a.v_proj = None
            m.gate_up_proj = stacked(m.gate_proj, m.up_proj)
            m.gate_proj = m.up_proj = None
        return self

    def compile_for_training(self):
        """torch.compile every block for gradient-tracking calls: the elementwise work between the
        matrix products (norms, RoPE, SiLU, softmax, LoRA scaling, and all their backward passes)
        fuses into a few loops. A LoRA step of SmolLM2 at 8 x 128 tokens in bf16 on 2 cores: 2.03
        -> 1.72 s. The blocks share one compiled graph, with dynamic shapes, so it compiles once
        (~70 s on 2 cores the first time, ~10 s from torch's cache) whatever the batch; evaluation keeps the eager blocks, whose inference attention
        loops over the input's length and would recompile for each."""
        for layer in self.layers:
            layer.compile_training = True
        return self

    def gradient_checkpointing(self, enabled: bool = True):
        """Trade compute for memory in training: each block keeps only its input and recomputes
        its activations during the backward pass (one more forward of every block: a LoRA step of
        SmolLM2 at 8 x 128 tokens in bf16 on 2 cores, 1.82 -> 2.34 s). Activation memory goes from
        every block's intermediates to one (B, T, dim) input per block plus one block's
        intermediates at a time (there, 1.4 GB -> 0.6 GB, most of what is left the loss's logits).
        Inference and evaluation (no gradients, or eval mode) run as before."""
        self.checkpoint_blocks = enabled
        return self

    def replace_linears(self, make, names=None, kind=nn.Linear):
        """Swap each linear layer of the blocks (or those named in `names`, e.g. "q_proj") for
        make(layer): quantised or kernel-backed versions for inference, LoRA layers for
        training. `kind`: the layer type to swap (LoRA layers, to merge them back). The output
        projection is each caller's own choice."""
        for block in self.layers:
            for parent in (block.self_attn, block.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, kind) and (names is None or name in names):
                        setattr(parent, name, make(child))
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class LlamaForClassification(nn.Module):
    """A Llama with a linear `score` head on the hidden state of each sequence's last token.

    The names are those of HF's `LlamaForSequenceClassification` (`model.` + the Llama's, and
    `score.weight`), so its state dict loads there as it is. Sequences are padded on the right:
    under causal attention the padding after a token cannot change it, so no mask is needed and
    SDPA keeps its fast causal path.
    """

    def __init__(self, model: Llama, num_labels: int):
        super().__init__()
        self.model = model
        self.score = nn.Linear(model.config.dim, num_labels, bias=False,
                               device=model.embed_tokens.weight.device, dtype=model.embed_tokens.weight.dtype)
        nn.init.normal_(self.score.weight, std=0.02)  # HF's initializer_range for a new head

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_labels) in fp32; lengths (B,) = real tokens per row (default: all)."""
        h = self.model.hidden_states(input_ids)                            # (B, T, dim)
        last = (lengths - 1) if lengths is not None else torch.full((h.shape[0],), h.shape[1] - 1)
        pooled = h[torch.arange(h.shape[0], device=h.device), last.to(h.device)]            # (B, dim)
        return self.score(pooled).float()

    def state_dict_hf(self) -> dict[str, torch.Tensor]:
        """Weights under HF LlamaForSequenceClassification's names (no LM head: it has none)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.lm_head.")}

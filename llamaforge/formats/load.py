"""Loading: any checkpoint path into a `Checkpoint` (`load_checkpoint`), and into a model and its
tokenizer ready to use (`load`): a run directory stands for its best model, an adapter for its
base model with the adapter applied."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import LlamaforgeError
from ..model.adapters import load_prefix, merge_lora_into_state, read_prefix, saved_modules
from ..model.llama import Llama
from ..text.tokenizer import Tokenizer
from . import gguf, hf, meta
from .checkpoint import Checkpoint, check_state_dict
from .paths import adapter_config, classifier_labels, model_kind, resolve_model_path, run_model_path


def load_adapter(path: Path, dtype: torch.dtype | None = None, weights: bool = True) -> Checkpoint:
    """The base model named by a LoRA or prefix adapter, with the adapter applied: LoRA folded
    into the weights (in fp32, then cast), a prefix attached as `Checkpoint.prefix`. weights=False:
    the base's header only, and the adapter named in the metadata but not applied."""
    kind, config_file, raw = adapter_config(path)
    is_lora = kind == "lora"
    base = raw.get("base_model_name_or_path")
    if not base:
        raise LlamaforgeError(f"{config_file}: no base_model_name_or_path, so the base model is unknown")
    if is_lora and raw.get("task_type") == "SEQ_CLS":
        raise LlamaforgeError(f"{path}: a classifier's adapter, not a language model; use it with "
                              f"`llamaforge predict` / `evaluate` on its run directory")
    if base != "default" and not Path(base).exists():
        raise LlamaforgeError(f"{config_file}: base model {base} not found")
    ckpt = load_checkpoint(base, dtype=torch.float32 if is_lora and weights else dtype, weights=weights)
    if is_lora and weights:
        merge_lora_into_state(ckpt.state_dict, path)
        # The merged weights are no longer what the file stored (e.g. Q4_1 blocks): quantising
        # them again as if they were would round the fine-tuning away.
        ckpt.metadata.pop("linear_weight_type", None)
        if dtype is not None:
            ckpt.state_dict = {k: v.to(dtype) for k, v in ckpt.state_dict.items()}
    elif weights:
        ckpt.prefix = read_prefix(path)
    ckpt.metadata.update(adapter=str(path), adapter_type="lora" if is_lora else "prefix")
    return ckpt


def load_checkpoint(model: str | os.PathLike | None = "default", dtype: torch.dtype | None = None,
                    weights: bool = True) -> Checkpoint:
    """Read any supported checkpoint (GGUF file, HF directory, Meta directory) into a Checkpoint.

    dtype: cast each tensor as it is read, so peak memory is one copy of the model in that dtype
    (plus one tensor) rather than a full fp32 copy as well. None keeps what the reader produces.
    weights=False: everything but the weights, whose tensors are shapes on the meta device (the
    headers are read, not the data: `info` on a 7B model takes no memory and no time).
    """
    path = run_model_path(resolve_model_path(model))
    fmt = model_kind(path)
    if fmt == "adapter":
        return load_adapter(path, dtype, weights)
    reader = {"gguf": gguf.load, "hf": hf.load, "meta": meta.load}[fmt]
    ckpt = reader(path, dtype, weights)
    ckpt.metadata.setdefault("format", fmt)
    ckpt.metadata.setdefault("path", str(path))
    check_state_dict(ckpt, path)
    return ckpt


def load_classifier(run: Path, dtype: torch.dtype | None = None) -> tuple[Checkpoint, torch.Tensor, list[str]]:
    """A classification run's model as one: (the Llama, its LoRA folded in or its full weights;
    the `score` head; the labels). For export to HF; `predict` keeps LoRA unmerged in bf16."""
    labels = classifier_labels(run)
    if labels is None:
        raise LlamaforgeError(f"{run}: not a classification run (no label_map.json)")
    best = run_model_path(run)
    method = "lora" if model_kind(best) == "adapter" else "full"
    if method == "lora":
        kind, config_file, raw = adapter_config(best)
        base = raw.get("base_model_name_or_path")
        if kind != "lora" or not base:
            raise LlamaforgeError(f"{config_file}: not a classifier's LoRA adapter with its base model")
        ckpt = load_checkpoint(base, dtype=torch.float32)
        merge_lora_into_state(ckpt.state_dict, best)
        score = saved_modules(best).get("score.weight")
        if score is None:
            raise LlamaforgeError(f"{best / 'adapter_model.safetensors'}: no score head (modules_to_save)")
        ckpt.metadata.pop("linear_weight_type", None)   # merged: no longer the file's own blocks
    else:
        ckpt, score = hf.load(best), hf.classifier_head(best)
    if dtype is not None:
        ckpt.state_dict = {k: v.to(dtype) for k, v in ckpt.state_dict.items()}
        score = score.to(dtype)
    ckpt.metadata.update(path=str(run), classifier={"labels": labels, "method": method})
    return ckpt, score, labels


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
         device: str = "cpu", quantize: str | None = None, inference: bool = False,
         batched: bool = False) -> tuple[Llama, Tokenizer]:
    """(model, tokenizer) from `default`, a .gguf file, an HF directory, a Meta directory, a
    LoRA / prefix adapter directory, or a training run directory (its best model).

    quantize="int8" | "int4": weight-only quantised linear layers for faster decoding (computes in
    bf16; see model/quantize.py). "auto": int4 when the file stores those weights as Q4_1 blocks (int4
    then holds them at their own precision) and the dtype is bf16, else nothing.
    inference: set up for generation only: stacked input projections (`Llama.fuse_projections`)
    and, for dense bf16 on an AVX-512 CPU, the hand-written decode kernel (`model/kernels.py`).
    batched: for a server: int4 layers keep their int4 values also in bf16 for prefill chunks,
    where the dense matmul is three times PyTorch's int4 kernel (not where the CPU has AMX tiles:
    int4_dense_mm_amx dequantises as it multiplies).
    """
    if quantize not in (None, "none", "auto", "int8", "int4"):
        raise LlamaforgeError(f"unknown quantization {quantize!r}; use int8, int4 or auto")
    from ..model.device import resolve_device
    device = str(resolve_device(device))
    if quantize == "int4" and device != "cpu":
        raise LlamaforgeError(f"--quantize int4 is CPU-only (PyTorch's int4 pack for the CPU); on {device} use "
                              f"--quantize int8 or none")
    if quantize in ("int8", "int4") and dtype is not None and parse_dtype(dtype) != torch.bfloat16:
        raise LlamaforgeError(f"--quantize {quantize} computes in bf16 (its kernels take bf16 activations), so it "
                              f"cannot run in {dtype}: leave out --dtype, or use --quantize none")
    dt = torch.bfloat16 if quantize in ("int8", "int4") else parse_dtype(dtype)
    ckpt = load_checkpoint(model, dtype=dt)
    if quantize == "auto":
        keeps_precision = ckpt.metadata.get("linear_weight_type") == "Q4_1"
        quantize = "int4" if keeps_precision and dt == torch.bfloat16 and device == "cpu" else None
    net = build_model(ckpt, dt, device)
    if ckpt.prefix is not None:
        load_prefix(net, ckpt.prefix, source=ckpt.metadata.get("adapter", "prefix"))
    ckpt.state_dict.clear()  # the model holds the only reference now; quantising frees as it goes
    if inference:
        net.fuse_projections()
    if quantize in ("int8", "int4"):
        from ..model.quantize import quantize_weights
        quantize_weights(net, bits=int(quantize[3:]), keep_dense=batched)
    elif inference:
        from ..model.kernels import use_gemv_kernel
        use_gemv_kernel(net)
    if inference:
        from ..model.kernels import use_cpu_kernels
        use_cpu_kernels(net)
    return net, ckpt.tokenizer

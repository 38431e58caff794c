"""What every fine-tuning recipe shares: the settings of the base model and the method (full,
LoRA, prefix), and the run directory's life cycle (a new run refuses a non-empty directory; a
resumed one reads its own saved settings)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LlamaforgeError
from ..model.adapters import ALL_LINEARS, LoRAConfig
from .runconfig import resolve_config
from .trainer import TrainConfig


@dataclass
class FinetuneConfig(TrainConfig):
    train: str | None = None
    dev: str | None = None
    out: str | None = None
    model: str = "default"
    method: str = "lora"                  # one of DEFAULT_LR's
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0             # dropout masks cost 23% of a step on 2 cores
    lora_targets: list[str] = field(default_factory=lambda: list(ALL_LINEARS))
    dtype: str = "bf16"
    max_length: int = 128
    eval_batch_size: int = 64
    lr: float | None = None               # None: the recipe's default for the method

    # Per method, measured (README): classification's on SST-2 and ChnSentiCorp; SFT sets its own.
    DEFAULT_LR = {"lora": 5e-4, "full": 2e-5}

    def __post_init__(self):
        if self.method not in self.DEFAULT_LR:
            raise LlamaforgeError(f"method must be {' or '.join(self.DEFAULT_LR)}, not {self.method!r}")
        if self.lr is None:
            self.lr = self.DEFAULT_LR[self.method]
        if self.dtype not in ("bf16", "fp32"):
            raise LlamaforgeError(f"dtype must be bf16 or fp32, not {self.dtype!r}")
        if self.max_length is not None and self.max_length < 2:
            raise LlamaforgeError(f"max-length must be at least 2, got {self.max_length}")
        super().__post_init__()

    def lora(self) -> LoRAConfig:
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets)


def open_run(cfg, resume: bool, required: str = "train"):
    """(the run's config, its directory) for any recipe's config with an `out` field. Resuming
    reads the settings saved with the run; a new run needs `required` and an empty directory."""
    if not cfg.out:
        raise LlamaforgeError("--out is required: the run directory")
    out = Path(cfg.out)
    if resume:
        if not (out / "config.yaml").exists():
            raise LlamaforgeError(f"{out}: nothing to resume (no config.yaml)")
        return resolve_config(type(cfg), out / "config.yaml"), out
    if not getattr(cfg, required):
        raise LlamaforgeError(f"--{required} is required")
    if out.exists() and any(out.iterdir()):
        raise LlamaforgeError(f"{out}: exists and is not empty (use --resume to continue that run, "
                              f"or choose another --out)")
    # Paths are recorded absolute, so the run (and `reproduce`) works from any directory.
    for name in PATH_FIELDS:
        value = getattr(cfg, name, None)
        if value and value != "default" and Path(value).exists():
            setattr(cfg, name, str(Path(value).resolve()))
    return cfg, out


PATH_FIELDS = ("train", "dev", "test", "model", "data", "val", "tokenizer")


def base_model_reference(model: str) -> str:
    """How a run records its base model: `default`, or an absolute path (a relative one would
    break as soon as the run is used from another directory)."""
    return model if model == "default" else str(Path(model).resolve())

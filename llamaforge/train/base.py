"""What every fine-tuning recipe shares: the settings of the base model and the method (full,
LoRA, prefix), and the run directory's life cycle (a new run refuses a non-empty directory; a
resumed one reads its own saved settings)."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LlamaforgeError
from ..files import write_json
from ..model.adapters import ALL_LINEARS, QUANTIZE_BASE, AdaLoRASchedule, LoRAConfig, add_lora, quantize_frozen_base
from .runconfig import resolve_config, write_yaml
from .trainer import TrainConfig

LORA_METHODS = ("lora", "adalora")   # the methods that train LoRA-shaped adapters (PEFT's layouts)


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
    quantize_base: str | None = None      # int8 | int4: LoRA over a quantised frozen base (QLoRA)
    # --method adalora (PEFT's AdaLoraConfig): the rank budget falls from init-rank to target-rank
    # per matrix; unset phases: the first 10% of steps unmasked, the last 20% at the final ranks.
    init_rank: int = 12
    target_rank: int = 8
    adalora_tinit: int | None = None
    adalora_tfinal: int | None = None
    adalora_delta_t: int = 1
    orth_reg_weight: float = 0.5

    # Per method, measured (README): classification's on SST-2 and ChnSentiCorp; SFT sets its own.
    # AdaLoRA: 10x LoRA's, its update B diag(E) A starting from E = 0 (shipped sentiment, 3 epochs:
    # dev accuracy 0.80 at 5e-4, 0.91 at 2e-3, 0.99 at 5e-3; LoRA r8 1.0 at 5e-4).
    DEFAULT_LR = {"lora": 5e-4, "adalora": 5e-3, "full": 2e-5}

    def __post_init__(self):
        if self.method not in self.DEFAULT_LR:
            raise LlamaforgeError(f"method must be {' or '.join(self.DEFAULT_LR)}, not {self.method!r}")
        if self.lr is None:
            self.lr = self.DEFAULT_LR[self.method]
        if self.dtype not in ("bf16", "fp32"):
            raise LlamaforgeError(f"dtype must be bf16 or fp32, not {self.dtype!r}")
        if self.quantize_base is not None:
            if self.quantize_base not in QUANTIZE_BASE:
                raise LlamaforgeError(f"quantize-base must be {' or '.join(QUANTIZE_BASE)}, not {self.quantize_base!r}")
            if self.method not in LORA_METHODS:
                raise LlamaforgeError(f"--quantize-base trains adapters over a frozen base: it needs --method lora or "
                                      f"adalora, not {self.method}")
            if self.distributed == "fsdp":   # FSDP shards parameters; the quantised base is buffers
                raise LlamaforgeError("--quantize-base does not combine with --distributed fsdp: use ddp (the default "
                                      "for adapters)")
        if self.max_length is not None and self.max_length < 2:
            raise LlamaforgeError(f"max-length must be at least 2, got {self.max_length}")
        super().__post_init__()

    def compile_measured(self) -> bool:
        # LoRA over a plain base is what was measured compiled (classification and SFT); full
        # fine-tuning, prefix tuning, AdaLoRA and a quantised base compile only when asked.
        return self.method == "lora" and self.quantize_base is None

    def lora(self) -> LoRAConfig:
        if self.method == "adalora":
            schedule = AdaLoRASchedule(target_rank=self.target_rank, tinit=self.adalora_tinit or 0,
                                       tfinal=self.adalora_tfinal or 0, delta_t=self.adalora_delta_t,
                                       orth_reg_weight=self.orth_reg_weight)
            return LoRAConfig(rank=self.init_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                              targets=self.lora_targets, adalora=schedule)
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets)

    def add_adapters(self, llama, lora: LoRAConfig | None = None):
        """LoRA layers (of `lora`, default this config's) on the Llama, over its base quantised
        when --quantize-base asks."""
        add_lora(llama, lora or self.lora())
        if self.quantize_base:
            quantize_frozen_base(llama, self.quantize_base)
        return llama


# What a resumed run may change: how long it goes on and how often it is evaluated, and where and
# how it computes (device, processes, micro-steps: the global batch stays what it was). Anything
# else would make it another run than the one its checkpoint and metrics belong to.
EXTENDABLE = ("epochs", "max_steps", "max_minutes", "eval_every", "patience",
              "device", "distributed", "nproc", "grad_accum", "gradient_checkpointing", "compile")


def saved_config(cls, out: Path):
    """The config a run in `out` was started with; it lives in `out` now, wherever it was made."""
    if not (out / "config.yaml").exists():
        raise LlamaforgeError(f"{out}: nothing to resume (no config.yaml)")
    return dataclasses.replace(resolve_config(cls, out / "config.yaml"), out=str(out))


def resume_config(cls, out: str | Path, given: dict):
    """The saved config of the run in `out`, with the settings in `given` (what the user passed
    besides --resume) that may change (EXTENDABLE) changed; any other that differs from the
    saved one is an error naming its flag."""
    saved = saved_config(cls, Path(out))
    changes = {}
    for key, value in given.items():
        if value is None or key == "out":
            continue
        before = getattr(saved, key)
        same = value == before or (key in PATH_FIELDS and Path(str(value)).resolve() == Path(str(before)).resolve())
        if key in EXTENDABLE:
            changes[key] = value
        elif not same:
            raise LlamaforgeError(f"--{key.replace('_', '-')} {value} differs from the run's {before} ({out}/config.yaml): "
                                  f"a resumed run keeps its settings; it may change only "
                                  + ", ".join("--" + k.replace("_", "-") for k in EXTENDABLE))
    return dataclasses.replace(saved, **changes)


def open_run(cfg, resume: bool, required: str = "train"):
    """(the run's config, its directory) for any recipe's config with an `out` field. Resuming
    takes the settings saved with the run, with those of EXTENDABLE that `cfg` sets otherwise
    than the saved ones and the defaults (more epochs, steps or minutes) written back; a new run
    needs `required` and an empty directory."""
    if not cfg.out:
        raise LlamaforgeError("--out is required: the run directory")
    out = Path(cfg.out)
    if resume:
        saved = saved_config(type(cfg), out)
        defaults = type(cfg)(out=cfg.out)
        changes = {k: getattr(cfg, k) for k in EXTENDABLE
                   if getattr(cfg, k) != getattr(saved, k) and getattr(cfg, k) != getattr(defaults, k)}
        if changes:
            saved = dataclasses.replace(saved, **changes)
            write_yaml(saved, out / "config.yaml")
            print(f"llamaforge: {out}: resuming with " + ", ".join(f"{k} = {v}" for k, v in changes.items()),
                  file=sys.stderr)
        return saved, out
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


def write_new_run(cfg, out: Path, resume: bool, world, json_files: dict | None = None):
    """A new run's directory with its config.yaml (and `json_files`, name -> content), written by
    rank 0 once every rank has found the directory as it was (empty: see open_run), and there for
    every rank afterwards. A resumed run has them already."""
    world.barrier()
    if not resume and world.main:
        out.mkdir(parents=True, exist_ok=True)
        write_yaml(cfg, out / "config.yaml")
        for name, content in (json_files or {}).items():
            write_json(out / name, content)
    world.barrier()


PATH_FIELDS = ("train", "dev", "test", "model", "data", "val", "tokenizer")


def base_model_reference(model: str) -> str:
    """How a run records its base model: `default`, or an absolute path (a relative one would
    break as soon as the run is used from another directory)."""
    return model if model == "default" else str(Path(model).resolve())

"""The training recipes by name, each a config dataclass and a function that runs it on the one
trainer: `llamaforge finetune classify | sft | dpo`, `llamaforge pretrain` and `llamaforge reproduce`
find them here, each imported on demand: only `finetune` and `pretrain` build flags from them."""
from __future__ import annotations

from ..errors import LlamaforgeError

RECIPES = ("classify", "sft", "dpo", "pretrain")


def recipe(name: str):
    """(config class, run(config, resume=False) -> final metrics) of a recipe."""
    if name == "classify":
        from .classify import ClassifyConfig, finetune_classify
        return ClassifyConfig, finetune_classify
    if name == "sft":
        from .sft import SFTConfig, finetune_sft
        return SFTConfig, finetune_sft
    if name == "dpo":
        from .dpo import DPOConfig, finetune_dpo
        return DPOConfig, finetune_dpo
    if name == "pretrain":
        from .pretrain import PretrainConfig, pretrain
        return PretrainConfig, pretrain
    raise LlamaforgeError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")

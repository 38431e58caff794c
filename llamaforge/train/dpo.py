"""Preference tuning: DPO and its kin on pairs of a chosen and a rejected answer. The loop is
`trainer.fit`; the pairs are read in `data/preferences.py`.

Losses (`--loss`), on the summed log-probabilities of each answer under the policy (pc, pr) and
the reference model (rc, rr), as TRL computes them:
    sigmoid  DPO:   -log sigmoid(beta * ((pc - rc) - (pr - rr)))
    ipo      IPO:   ((pc - rc) - (pr - rr) - 1 / (2 beta))^2, on log-probabilities averaged per token
    simpo    SimPO: -log sigmoid(beta * (pc / |yc| - pr / |yr|) - gamma), no reference model
`--sft-weight w` adds w x the chosen answer's mean next-token loss (TRL's rpo_alpha).

The reference model is the base: for LoRA the same model with its adapters switched off (no
second copy of the weights); for full fine-tuning its log-probabilities are computed once before
training and kept in the run directory (`reference_logps.safetensors`), so a resumed run uses
the same ones. Chosen and rejected answers of a batch go through one forward pass.

Run directory: as `finetune sft`'s (best/ a PEFT adapter or an HF directory), metrics with the
dev loss, preference accuracy (the chosen answer's implicit reward above the rejected one's) and
mean reward margin.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.batching import length_bucketed_batches, pad_labelled, share
from ..data.preferences import encode_pair, read_pairs, scored_rows
from ..errors import LlamaforgeError
from ..evaluate.lm import answer_logps, pair_logps
from ..files import atomic_path
from ..model.adapters import adapters_disabled
from ..provenance.modelcard import check_licence, write_run_cards
from .base import FinetuneConfig, open_run, write_new_run
from .distributed import init_world
from .sft import build_model_and_length, save_model
from .trainer import fit, write_metrics

LOSSES = ("sigmoid", "ipo", "simpo")


@dataclass
class DPOConfig(FinetuneConfig):
    loss: str = "sigmoid"
    beta: float = 0.1                     # TRL's default for every loss
    simpo_gamma: float = 0.5              # SimPO's target margin (TRL's CPOConfig default)
    sft_weight: float = 0.0
    batch_size: int = 8                   # pairs per optimiser step
    max_length: int | None = None         # prompt + answer; None: 512, or the model's context if shorter
    eval_batch_size: int = 16
    metric: str = "loss"
    greater_is_better: bool = False

    # full: TRL's default. LoRA, measured on the shipped pairs (README): 5e-4 reached dev loss 0.40
    # in one epoch, 5e-5 0.55 in two. AdaLoRA 10x LoRA's, as for classification (FinetuneConfig).
    DEFAULT_LR = {"lora": 5e-4, "adalora": 5e-3, "full": 1e-6}

    def compile_measured(self) -> bool:
        return False   # two models' passes a step (policy and reference): not measured compiled

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise LlamaforgeError(f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.beta <= 0:
            raise LlamaforgeError(f"beta must be positive, got {self.beta}")
        super().__post_init__()


def preference_loss(pc, pr, rc, rr, nc, nr, cfg: DPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reward margin) per pair from summed log-probabilities (policy pc, pr; reference rc,
    rr; answer lengths nc, nr). The margin is what the loss pushes up: the chosen answer's
    implicit reward minus the rejected one's."""
    if cfg.loss == "simpo":
        logits = pc / nc - pr / nr - cfg.simpo_gamma / cfg.beta
        margin = cfg.beta * (pc / nc - pr / nr)
        loss = -F.logsigmoid(cfg.beta * logits)
    elif cfg.loss == "ipo":
        logits = (pc / nc - rc / nc) - (pr / nr - rr / nr)
        margin = cfg.beta * logits
        loss = (logits - 1 / (2 * cfg.beta)) ** 2
    else:
        logits = (pc - rc) - (pr - rr)
        margin = cfg.beta * logits
        loss = -F.logsigmoid(cfg.beta * logits)
    if cfg.sft_weight:
        loss = loss + cfg.sft_weight * (-pc / nc)
    return loss, margin


class PreferenceTask:
    """Encoded pairs for `trainer.fit`; batches of pairs of similar length."""

    def __init__(self, cfg: DPOConfig, train, dev, tok, reference: dict | None):
        self.cfg, self.train, self.dev, self.tok = cfg, train, dev, tok
        self.lengths = [len(p) + max(len(c), len(r)) for p, c, r in train]
        self.reference = reference   # full fine-tuning: {"train": (N, 2), "dev": (M, 2)}; else None

    def train_batches(self, epoch, generator):
        return length_bucketed_batches(self.lengths, self.cfg.batch_size, generator)

    def losses(self, model, pairs, split: str, idx: list[int]):
        """(loss, reward margin) per pair, chosen and rejected answers in one forward pass."""
        ids, labels = pad_labelled(scored_rows(pairs), self.tok.pad_id)
        logps, n = answer_logps(model, ids, labels)
        pc, pr, nc, nr = logps[0::2], logps[1::2], n[0::2].float(), n[1::2].float()
        if self.cfg.loss == "simpo":
            rc = rr = torch.zeros_like(pc)
        elif self.reference is not None:
            ref = self.reference[split][idx].to(pc.device)
            rc, rr = ref[:, 0], ref[:, 1]
        else:   # LoRA: the same model without its adapters
            with torch.no_grad(), adapters_disabled(model):
                ref, _ = answer_logps(model, ids, labels)
            rc, rr = ref[0::2], ref[1::2]
        loss, margin = preference_loss(pc, pr, rc, rr, nc, nr, self.cfg)
        return loss, margin

    def loss(self, model, idx):
        loss, _ = self.losses(model, [self.train[i] for i in idx], "train", idx)
        return loss.sum(), sum(self.lengths[i] for i in idx)

    def units(self, idx):
        return len(idx)

    def evaluate(self, model, world):
        idx = share(list(range(len(self.dev))), world.rank, world.size)
        total_loss, right, margins = 0.0, 0, 0.0
        for s in range(0, len(idx), self.cfg.eval_batch_size):
            part = idx[s:s + self.cfg.eval_batch_size]
            loss, margin = self.losses(model, [self.dev[i] for i in part], "dev", part)
            total_loss, right, margins = total_loss + float(loss.sum()), right + int((margin > 0).sum()), \
                margins + float(margin.sum())
        total_loss, right, margins = world.sum([total_loss, right, margins])
        n = len(self.dev)
        return {"loss": total_loss / n, "accuracy": right / n, "margin": margins / n, "n": n}

    def format_metrics(self, m):
        return f"dev preference accuracy {m['accuracy']:.3f}, mean reward margin {m['margin']:.4f}"

    def save_model(self, model, out_dir):
        save_model(model, out_dir, self.cfg, self.tok)


def cached_reference(model, train, dev, cfg: DPOConfig, tok, out: Path, world) -> dict:
    """Full fine-tuning's reference log-probabilities: computed once from the base model before
    the first step and kept in the run directory (a resumed run's model is no longer the base)."""
    from safetensors.torch import load_file, save_file
    path = out / "reference_logps.safetensors"
    if not path.exists():
        world.log("llamaforge: reference log-probabilities of the base model, once")
        model.eval()
        ref = {"train": pair_logps(model, train, tok.pad_id, cfg.eval_batch_size),
               "dev": pair_logps(model, dev, tok.pad_id, cfg.eval_batch_size)}
        model.train()
        if world.main:
            with atomic_path(path) as tmp:
                save_file(ref, str(tmp))
        world.barrier()
    return load_file(str(path))


def finetune_dpo(cfg: DPOConfig, resume: bool = False) -> dict | None:
    """Train on preference pairs; keep the best model by dev loss; returns its dev metrics (under
    torchrun: on rank 0; the other ranks return None)."""
    world = init_world(cfg.device)
    cfg, out = open_run(cfg, resume)
    if not cfg.dev:
        raise LlamaforgeError("--dev is required: preference pairs to evaluate on")
    if cfg.method not in ("lora", "adalora", "full"):
        raise LlamaforgeError(f"finetune dpo takes --method lora, adalora or full, not {cfg.method!r}")
    train, dev = read_pairs(cfg.train), read_pairs(cfg.dev)
    model, tok = build_model_and_length(cfg)
    enc_train = [encode_pair(tok, p, cfg.max_length) for p in train]
    enc_dev = [encode_pair(tok, p, cfg.max_length) for p in dev]
    write_new_run(cfg, out, resume, world)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    world.log(f"llamaforge: {len(train)} train / {len(dev)} dev pairs; {cfg.loss} loss, beta {cfg.beta}; method "
              f"{cfg.method}, {n_trainable:,} trainable parameters, {cfg.dtype}")
    reference = None
    if cfg.method == "full" and cfg.loss != "simpo":
        reference = cached_reference(model, enc_train, enc_dev, cfg, tok, out, world)
    terms = check_licence(cfg.model, out) if world.main else None
    task = PreferenceTask(cfg, enc_train, enc_dev, tok, reference)
    history = fit(model, task, cfg, out, resume=resume, world=world)
    if not world.main:
        return None
    best_step = history["state"]["best_step"]
    best = next(e for e in history["evals"] if e["step"] == best_step)
    final = {"dev": {k: best[k] for k in ("loss", "accuracy", "margin", "n")} | {"best_step": best_step}}
    write_metrics(out, history, final)
    write_run_cards(out, "dpo", cfg, [cfg.train, cfg.dev], final, ["text-generation", "conversational"], terms)
    return final

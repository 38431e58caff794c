"""AdaLoRA's rank allocation (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-
Efficient Fine-Tuning"), step for step as PEFT's RankAllocator computes it, so that a run here
and a run with PEFT's AdaLoraModel mask the same triplets.

After each optimiser step (before the gradients are cleared) `RankAllocator.step`:
- updates every adapter entry's importance: sensitivity |p * grad| smoothed by beta1, and its
  uncertainty |sensitivity - smoothed| smoothed by beta2; an entry scores smoothed x uncertainty;
- scores each singular triplet i of a matrix: E_i's score + the mean score of A's row i + the
  mean score of B's column i;
- masks (E_i = 0) every triplet scoring at or below the k-th lowest score of all matrices, k being
  the initial budget less the step's budget (AdaLoRASchedule's cubic curve), every delta_t steps;
- at step total - tfinal fixes the mask for good, and from then on re-applies it each step.

The orthogonal regulariser (`penalty`) keeps each A's rows and B's columns near orthonormal, so
that E's values act as singular values; the trainer adds it to each step's loss.
"""
from __future__ import annotations

import torch

from ..model.adapters import AdaLoRALinear, AdaLoRASchedule


def adalora_layers(model: torch.nn.Module) -> list[tuple[str, AdaLoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaLoRALinear)]


def resolve_schedule(schedule: AdaLoRASchedule, total_steps: int, tinit: int | None, tfinal: int | None):
    """Fill in the run's length and the phases (unset: the first 10% of steps before any masking,
    the last 20% with the final ranks), in place."""
    schedule.total_step = total_steps
    schedule.tinit = round(0.1 * total_steps) if tinit is None else tinit
    schedule.tfinal = round(0.2 * total_steps) if tfinal is None else tfinal
    if schedule.tinit >= total_steps - schedule.tfinal:
        from ..errors import LlamaforgeError
        raise LlamaforgeError(f"AdaLoRA needs steps between its warm-up ({schedule.tinit}) and its final phase "
                              f"({schedule.tfinal}) in a run of {total_steps} steps: train longer or shorten them")
    return schedule


class RankAllocator:
    """The importance statistics and the masks of one model's AdaLoRA layers (all share one
    schedule). `optimised(p)`: the tensor the optimiser updates for the model's parameter p (with
    its gradient): p itself, or its fp32 master."""

    def __init__(self, model: torch.nn.Module, optimised=lambda p: p):
        self.layers = adalora_layers(model)
        self.schedule = self.layers[0][1].schedule
        self.triplets = [(optimised(layer.lora_A), optimised(layer.lora_E), optimised(layer.lora_B), layer)
                         for _, layer in self.layers]
        self.init_budget = sum(layer.lora_A.shape[0] for _, layer in self.layers)
        self.target_budget = self.schedule.target_rank * len(self.layers)
        self.reset()

    def reset(self):
        # Smoothed sensitivity and uncertainty per entry of A, E, B (zeros: PEFT starts them so).
        self.sensitivity = [[torch.zeros_like(t) for t in trip[:3]] for trip in self.triplets]
        self.uncertainty = [[torch.zeros_like(t) for t in trip[:3]] for trip in self.triplets]

    def budget(self, step: int) -> tuple[int, bool]:
        """(the rank budget of all matrices together at `step`, whether to mask at it)."""
        s = self.schedule
        if step <= s.tinit:
            return self.init_budget, False
        if step > s.total_step - s.tfinal:
            return self.target_budget, True
        left = 1 - (step - s.tinit) / (s.total_step - s.tfinal - s.tinit)
        return int((self.init_budget - self.target_budget) * left ** 3 + self.target_budget), step % s.delta_t == 0

    @torch.no_grad()
    def _update_importance(self):
        s = self.schedule
        for trip, sens, unc in zip(self.triplets, self.sensitivity, self.uncertainty, strict=True):
            for i, p in enumerate(trip[:3]):
                ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                sens[i] = s.beta1 * sens[i] + (1 - s.beta1) * ipt
                unc[i] = s.beta2 * unc[i] + (1 - s.beta2) * (ipt - sens[i]).abs()

    @torch.no_grad()
    def _mask_to_budget(self, budget: int):
        scores = []
        for sens, unc in zip(self.sensitivity, self.uncertainty, strict=True):
            a, e, b = (sens[i] * unc[i] for i in range(3))
            scores.append(e.view(-1) + (a.mean(dim=1) + b.mean(dim=0)))   # PEFT's order of sums
        k = self.init_budget - budget
        if k < 1:
            return
        threshold = torch.kthvalue(torch.cat(scores), k)[0].item()
        for (_, e, _, layer), score in zip(self.triplets, scores, strict=True):
            layer.kept.copy_(score > threshold)
            self._apply_mask(e, layer)

    @staticmethod
    def _apply_mask(e: torch.Tensor, layer: AdaLoRALinear):
        e.masked_fill_(~layer.kept.view(-1, 1), 0.0)
        if e is not layer.lora_E:   # a master copy: the model's own follows at the copy-back
            layer.lora_E.masked_fill_(~layer.kept.view(-1, 1), 0.0)

    @torch.no_grad()
    def step(self, step: int):
        """After optimiser step number `step` (0 for the first), its gradients still there."""
        s = self.schedule
        final = s.total_step - s.tfinal
        if step < final:
            self._update_importance()
            budget, mask = self.budget(step)
            if mask:
                self._mask_to_budget(budget)
        elif step == final:   # the final ranks
            self._mask_to_budget(self.target_budget)
            self.reset()
        else:
            for _, e, _, layer in self.triplets:
                self._apply_mask(e, layer)

    def penalty(self) -> torch.Tensor:
        """Mean over the A and B matrices of ||A A^T - I||_F and ||B^T B - I||_F, on the model's
        own tensors (those the forward pass uses, so that its gradient reaches them)."""
        total = 0.0
        for _, layer in self.layers:
            for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                total = total + torch.norm(cov - eye, p="fro")
        return total / (2 * len(self.layers))

    # --- checkpoints ------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The statistics, by name, for a checkpoint (filled in place when one loads)."""
        out = {}
        for (name, _), sens, unc in zip(self.layers, self.sensitivity, self.uncertainty, strict=True):
            for i, part in enumerate("AEB"):
                out[f"{name}.{part}.sensitivity"], out[f"{name}.{part}.uncertainty"] = sens[i], unc[i]
        return out

    def kept(self) -> dict[str, list[bool]]:
        return {name: layer.kept.tolist() for name, layer in self.layers}

    def state(self) -> dict:
        """What a checkpoint's meta keeps besides the statistics: the schedule as resolved when the
        run began (a resumed run that goes on longer keeps its budget's plan) and the masks."""
        s = self.schedule
        return {"schedule": {"total_step": s.total_step, "tinit": s.tinit, "tfinal": s.tfinal}, "kept": self.kept()}

    def restore(self, state: dict):
        from ..errors import LlamaforgeError
        if set(state.get("kept", {})) != {name for name, _ in self.layers}:
            raise LlamaforgeError("the checkpoint's AdaLoRA masks do not match this model's adapted layers")
        for key, value in state["schedule"].items():
            setattr(self.schedule, key, value)
        for name, layer in self.layers:
            layer.kept.copy_(torch.tensor(state["kept"][name]))

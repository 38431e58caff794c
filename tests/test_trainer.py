"""The training loop itself (`trainer.fit`) on a model small enough to check by hand: its steps are
plain AdamW steps, whatever the parameters' dtype."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from llamaforge.train import checkpoint
from llamaforge.train.trainer import TrainConfig, fit, optimizer_groups


class Regression:
    """A least-squares task on fixed batches, for `fit`."""

    def __init__(self, n_batches=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n_batches)]

    def train_batches(self, epoch, generator):
        return [[i] for i in range(len(self.data))]   # one batch (of one item) a step

    def loss(self, model, items):
        x, y = self.data[items[0]]
        return ((model(x.to(model.weight.dtype)).float() - y) ** 2).sum(), x.shape[0]

    def units(self, items):
        return self.data[items[0]][1].numel()   # the loss is a mean over them

    def evaluate(self, model, world):
        return {"loss": sum(float(self.loss(model, [i])[0]) / self.units([i]) for i in range(len(self.data)))}

    def save_model(self, model, out_dir):
        pass


def reference_adamw(model, task, steps, cfg):
    """The same steps with torch's own per-tensor AdamW on fp32 parameters."""
    params = list(model.named_parameters())
    opt = torch.optim.AdamW(optimizer_groups(params, cfg.weight_decay), lr=cfg.lr, foreach=False)
    for i in range(steps):
        items = [i % len(task.data)]
        (task.loss(model, items)[0] / task.units(items)).backward()
        opt.step()
        opt.zero_grad()
    return model


def test_fit_steps_are_adamw_steps_in_fp32_and_bf16(tmp_path, monkeypatch):
    cfg = TrainConfig(max_steps=6, lr=0.05, warmup=0, schedule="constant", max_grad_norm=None, weight_decay=0.1,
                      metric="loss", greater_is_better=False, save_every=1000)
    task = Regression()
    torch.manual_seed(0)
    start = nn.Linear(6, 3)
    expected = reference_adamw(copy.deepcopy(start), task, cfg.max_steps, cfg)

    optimizers = []
    adamw = torch.optim.AdamW

    def recording_adamw(*args, **kwargs):
        optimizers.append(adamw(*args, **kwargs))
        return optimizers[-1]
    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)

    fp32 = copy.deepcopy(start)
    fit(fp32, task, cfg, tmp_path / "fp32")
    # An fp32 parameter is its own master: the optimiser updates the model's tensor itself.
    stepped = [p for g in optimizers[-1].param_groups for p in g["params"]]
    assert any(p is fp32.weight for p in stepped) and any(p is fp32.bias for p in stepped)
    torch.testing.assert_close(fp32.weight, expected.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fp32.bias, expected.bias, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(fp32.weight, start.weight)

    # bf16: the forward and backward pass round, but the update itself is taken on fp32 masters,
    # so the parameters follow the fp32 run's. (Not every one: Adam's first steps move a weight by
    # about lr times the sign of its gradient, and a near-zero gradient's sign may flip in bf16.)
    bf16 = copy.deepcopy(start).to(torch.bfloat16)
    fit(bf16, task, cfg, tmp_path / "bf16")
    assert bf16.weight.dtype == torch.bfloat16
    assert not any(p is bf16.weight for g in optimizers[-1].param_groups for p in g["params"])
    moved = (expected.weight - start.weight).abs().median()
    assert (bf16.weight.float() - expected.weight).abs().median() < 0.1 * moved
    saved = [("weight", torch.zeros(3, 6)), ("bias", torch.zeros(3))]
    checkpoint.load(tmp_path / "bf16" / "checkpoint", saved, torch.optim.AdamW([t for _, t in saved], fused=True))
    assert saved[0][1].dtype == torch.float32
    torch.testing.assert_close(saved[0][1].bfloat16(), bf16.weight, atol=0, rtol=0)

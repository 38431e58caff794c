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


class MeasuredCompiled(TrainConfig):
    def compile_measured(self):   # as FinetuneConfig's LoRA
        return True


def test_compile_is_the_default_only_where_it_was_measured_to_pay(monkeypatch):
    """--compile unset: on for CPU LoRA runs of enough steps (fewer once this machine has the step
    compiled) where torch.compile can build; not on a GPU, under FSDP, in a run whose time budget
    the compilation would eat, or for what was not measured compiled (full fine-tuning, prefix
    tuning, AdaLoRA, a quantised base, DPO, pretraining)."""
    from llamaforge.model import kernels
    from llamaforge.train.base import FinetuneConfig
    from llamaforge.train.distributed import World
    from llamaforge.train.dpo import DPOConfig
    from llamaforge.train.pretrain import PretrainConfig
    from llamaforge.train.trainer import COMPILE_MIN_STEPS, compile_by_default
    cpu, cached, first = World(), COMPILE_MIN_STEPS["cached"], COMPILE_MIN_STEPS["first"]
    assert cached < first
    monkeypatch.setattr(kernels, "compile_missing", lambda: None)
    assert compile_by_default(FinetuneConfig(), cached, cpu, None, cached=True)
    assert not compile_by_default(FinetuneConfig(), cached, cpu, None, cached=False)
    assert compile_by_default(FinetuneConfig(), first, cpu, None, cached=False)
    assert compile_by_default(FinetuneConfig(), cached, cpu, "ddp", cached=True)
    assert compile_by_default(FinetuneConfig(max_minutes=10), cached, cpu, None, cached=True)
    assert not compile_by_default(FinetuneConfig(), cached - 1, cpu, None, cached=True)
    assert not compile_by_default(FinetuneConfig(), first, World(device=torch.device("cuda")), None, cached=True)
    assert not compile_by_default(FinetuneConfig(), first, cpu, "fsdp", cached=True)
    assert not compile_by_default(FinetuneConfig(max_minutes=1), first, cpu, None, cached=True)
    for unmeasured in (FinetuneConfig(method="full"), FinetuneConfig(method="adalora"), FinetuneConfig(quantize_base="int4"),
                       DPOConfig(), PretrainConfig()):
        assert not compile_by_default(unmeasured, first, cpu, None, cached=True), unmeasured
    monkeypatch.setattr(kernels, "compile_missing", lambda: "a C++ compiler")
    assert not compile_by_default(FinetuneConfig(), first, cpu, None, cached=True)


def test_fit_compiles_the_blocks_by_default_for_a_long_run(tmp_path, monkeypatch, tiny_bpe):
    """fit asks its Llama for compiled training blocks when --compile is unset and the run is long
    enough: longer the first time, shorter once a step ran them compiled and left its mark beside
    torch's cache (thresholds lowered here; compile_for_training recorded, not run: compiled
    training itself is tested in test_model.py); always with --compile, never with --compile
    false. The decision is written into the config (the model card records it)."""
    from llamaforge.evaluate.lm import next_token_loss
    from llamaforge.formats.load import build_model
    from llamaforge.model import kernels
    from llamaforge.model.llama import Llama
    from llamaforge.train import trainer

    from conftest import random_model
    llama = build_model(random_model("tiny", tiny_bpe)[0], "fp32")

    class NextToken(Regression):
        def loss(self, model, items):
            ids = torch.arange(items[0], items[0] + 8)[None] % model.config.vocab_size
            model.ran_compiled |= reaches["compiled"]   # as a batch of rows would, through the compiled blocks
            return next_token_loss(model, ids, ids, reduction="sum")[0], 7

        def units(self, items):
            return 7

    calls, reaches = [], {"compiled": False}
    monkeypatch.setattr(Llama, "compile_for_training", lambda self: calls.append(self))
    monkeypatch.setattr(kernels, "compile_missing", lambda: None)
    monkeypatch.setattr(trainer, "COMPILE_MIN_STEPS", {"cached": 3, "first": 5})
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    marks = tmp_path / "inductor" / "llamaforge-compiled"
    base = dict(lr=1e-3, metric="loss", save_every=1000)
    # (steps, --compile, whether its steps reach the compiled blocks, compiled?, marked after?)
    for n, (steps, compile, ran, expected, marked) in enumerate([
            (3, None, False, False, False), (5, None, False, True, False),   # a batch of one row: eager, no mark
            (3, None, False, False, False), (5, None, True, True, True),
            (3, None, True, True, True), (2, None, True, False, True), (2, True, True, True, True),
            (5, False, True, False, True)]):
        calls.clear()
        llama.ran_compiled, reaches["compiled"] = False, ran
        cfg = MeasuredCompiled(max_steps=steps, compile=compile, **base)
        fit(llama, NextToken(), cfg, tmp_path / str(n))
        assert calls == ([llama] if expected else []), (steps, compile)
        assert cfg.compile == expected
        assert (len(list(marks.iterdir())) == 1) == marked, n


def test_the_direction_of_the_metric_follows_its_name_unless_given():
    """As HF's Trainer: a loss (or perplexity) is better lower, anything else higher; --greater-is-better
    decides where given (classification's dev loss is a metric too)."""
    from llamaforge.train.classify import ClassifyConfig
    assert TrainConfig().greater_is_better is True                       # accuracy
    assert TrainConfig(metric="loss").greater_is_better is False
    assert TrainConfig(metric="perplexity").greater_is_better is False
    assert ClassifyConfig(metric="loss").greater_is_better is False
    assert ClassifyConfig(metric="macro_f1").greater_is_better is True
    assert TrainConfig(metric="loss", greater_is_better=True).greater_is_better is True

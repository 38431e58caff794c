"""The floor under a training step: its matrix products alone, at this CPU's speed.

A LoRA step of SmolLM2 spends most of its time in matrix products that oneDNN runs near the
CPU's peak (forward, and the input gradients that backward must carry through every frozen
layer), and transformers + peft runs the same products. What an implementation can win is the
time between them. So the highest ratio any implementation can reach over the peer at a shape is
(the peer's step) / (the products of the step, run back to back): `bench_classify.py --floor` and
`bench_sft.py --floor` print it as a column beside the two implementations.

How: one llamaforge step (forward and backward) runs under a dispatch mode that records every
matrix-product call (op, shapes, strides, dtypes); the floor is the time of those calls replayed
on fresh tensors of the same layout, with nothing else in between (caches stay warm, so the floor
is, if anything, lower than the products' time inside a step)."""
from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
            torch.ops.aten.addmm_.default, torch.ops.aten.baddbmm.default, torch.ops.aten.addbmm.default}


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS:
            spec = [(a.shape, a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, spec, dict(kwargs)))
        return func(*args, **kwargs)


def record_products(step) -> list:
    """The matrix-product calls step() makes (its backward included), in order."""
    with _Record() as mode:
        step()
    return mode.calls


_inputs: dict = {}   # (shape, stride, dtype, device) -> a random tensor, shared by every replay


def _input(shape, stride, dtype, device) -> torch.Tensor:
    # One tensor per layout: a step's 1,800 products each with inputs of their own would hold
    # gigabytes. The whole model's weights fit in this machine's L3 either way, and products of
    # 1,024 rows are bound by arithmetic, not by where their operands come from.
    key = (tuple(shape), tuple(stride), dtype, device)
    if key not in _inputs:
        # The storage the layout spans (an expanded gradient has zero strides), then the view.
        size = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) if all(shape) else 0
        base = torch.empty(size, dtype=dtype, device=device)
        base = base.normal_() if base.is_floating_point() else base.zero_()
        _inputs[key] = base.as_strided(shape, stride)
    return _inputs[key]


class Replay:
    """Runs recorded products back to back on random tensors of the same shapes, strides, dtypes
    and devices."""

    def __init__(self, calls: list):
        self.calls = [(func, [_input(*a) if isinstance(a, tuple) and len(a) == 4 and isinstance(a[2], torch.dtype) else a
                              for a in spec], kwargs) for func, spec, kwargs in calls]
        self.sync = torch.cuda.synchronize if any(
            isinstance(a, torch.Tensor) and a.is_cuda for _, spec, _ in self.calls for a in spec) else (lambda: None)

    def __call__(self) -> float:
        """Seconds for one pass over every call."""
        self.sync()
        t = time.perf_counter()
        with torch.no_grad():
            for func, args, kwargs in self.calls:
                func(*args, **kwargs)   # in-place ones (addmm_) write into their own scratch tensor
        self.sync()
        return time.perf_counter() - t

    @property
    def flop(self) -> float:
        """Multiply-adds x 2 of the calls (for a GFLOP/s figure)."""
        total = 0.0
        for func, args, _ in self.calls:
            a, b = (args[1], args[2]) if func not in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default) else args[:2]
            total += 2 * a.numel() * b.shape[-1]
        return total


class ProductsAlone:
    """A benchmark "implementation" (`block(batches)` -> seconds a step, as the others in
    bench_classify.py and bench_sft.py) whose step is the recorded products of another's step on
    the same batch. step_of(batch) -> a callable that runs that implementation's forward and
    backward on the batch; key(batch): batches with one key share a recording (equal shapes)."""

    def __init__(self, step_of, key):
        self.step_of, self.key, self.replays = step_of, key, {}

    def block(self, data) -> list[float]:
        out = []
        for batch in data:
            k = self.key(batch)
            if k not in self.replays:
                self.replays[k] = Replay(record_products(self.step_of(batch)))
                self.replays[k]()   # warm-up: oneDNN builds its kernels for the shapes
            out.append(self.replays[k]())
        return out


# The --floor flag and its columns, as bench_classify.py and bench_sft.py print them.
FLOOR_HELP = ("also time the matrix products of llamaforge's step alone: the highest ratio any implementation "
              "could reach at these products' speed (products_floor.py)")
FLOOR_HEADER = "   | products alone, ratio (the floor), ours of it: eager / compiled"


def floor_columns(peer: float, eager: float, compiled: float, products: float | None) -> str:
    """Products-alone speed, its ratio over the peer's (the floor) and our eager and compiled
    speeds as shares of it; "" without a products figure."""
    if not products:
        return ""
    return f"   | {products:8.1f} {products / peer:5.2f}x  {eager / products:4.0%} / {compiled / products:4.0%}"

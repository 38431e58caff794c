"""benchmarks/products_floor.py: the matrix products of a training step, recorded and replayed
(the floor that `bench_classify.py --floor` and `bench_sft.py --floor` print)."""
import sys
from pathlib import Path

import torch

from llamaforge.model.adapters import LoRAConfig, LoRALinear

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from products_floor import ProductsAlone, Replay, record_products  # noqa: E402


def test_the_backward_products_are_recorded_with_their_shapes():
    torch.manual_seed(0)
    frozen = torch.nn.Linear(32, 48, bias=False).requires_grad_(False)
    x = torch.randn(5, 32, requires_grad=True)
    calls = record_products(lambda: frozen(x).sum().backward())
    # forward x W^T, and backward's input gradient dy W (no weight gradient: W is frozen)
    assert [tuple(tuple(a[0]) for a in spec[:2]) for _, spec, _ in calls] == [((5, 32), (32, 48)), ((5, 48), (48, 32))]
    replay = Replay(calls)
    assert replay.flop == 2 * (2 * 5 * 32 * 48)
    assert replay() > 0


def test_a_lora_step_records_its_adapter_products_and_replays_each_shape_once():
    torch.manual_seed(0)
    lora = LoRALinear(torch.nn.Linear(32, 48), LoRAConfig(rank=4, alpha=8, dropout=0.0))
    batches = [torch.randn(5, 32), torch.randn(5, 32), torch.randn(7, 32)]
    calls = record_products(lambda: lora(batches[0]).sum().backward())
    # base (addmm, with its bias), x A^T, + h B^T; backward: dh, dB, dA (and no dx: x needs no
    # gradient, W is frozen)
    shapes = [tuple(tuple(a[0]) for a in spec if isinstance(a, tuple)) for _, spec, _ in calls]
    assert len(calls) == 6 and ((5, 32), (32, 4)) in shapes and ((5, 48), (5, 4), (4, 48)) in shapes
    recorded = []
    alone = ProductsAlone(lambda x: (recorded.append(x.shape), lambda: lora(x).sum().backward())[1],
                          key=lambda x: tuple(x.shape))
    times = alone.block(batches)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert recorded == [(5, 32), (7, 32)]   # equal shapes share a recording

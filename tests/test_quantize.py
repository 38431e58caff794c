"""Weight-only int8: close to the dense model, and the same whichever kernel path runs."""
import torch

from llamaforge.loader import build_model
from llamaforge.quantize import Int8Linear, quantize_int8

from conftest import random_model


def test_int8_linear_error_is_bounded_per_row():
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    lin = Int8Linear(w, None, torch.bfloat16)
    deq = lin.weight.float() * lin.scales.float()[:, None]
    # Symmetric rounding: at most half a step (amax / 127 / 2) per weight, plus bf16 scale rounding.
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((deq - w).abs() <= step * 0.5 + w.abs() * 2 ** -8).all()


def test_kernel_and_dequantised_paths_agree():
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(1))
    lin = Int8Linear(w, torch.randn(96), torch.bfloat16)
    x = torch.randn(1, 3, 64).bfloat16()
    small = lin(x)                                   # int8 kernel (few rows)
    big = lin(x.repeat(1, 20, 1))[:, :3]              # dequantise + dense matmul
    assert small.shape == (1, 3, 96)
    assert (small.float() - big.float()).abs().max() < 0.05 * big.float().abs().max()


def test_int8_model_tracks_the_dense_model(tiny_bpe):
    ckpt, _ = random_model("tiny", tiny_bpe)
    dense = build_model(ckpt, "bf16")
    q = quantize_int8(build_model(ckpt, "bf16"))
    assert isinstance(q.layers[0].self_attn.q_proj, Int8Linear) and isinstance(q.lm_head, Int8Linear)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = dense(ids).float(), q(ids).float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert (a - b).abs().max() < 0.1 * a.abs().max()

"""The hand-written decode kernel (model/kernels.py) computes what PyTorch's matmul does."""
import pytest
import torch

from llamaforge.formats.load import build_model
from llamaforge.model.generation import SamplingConfig, generate_tokens
from llamaforge.model.kernels import GemvLinear, gemv_extension, use_gemv_kernel

from conftest import random_model


def test_gemv_kernel_matches_pytorch(tiny_bpe):
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: llamaforge uses F.linear")
    lin = torch.nn.Linear(200, 300, bias=True).bfloat16()
    x = torch.randn(1, 1, 200).bfloat16()
    fast = GemvLinear(lin)
    assert ((fast(x).float() - lin(x).float()).abs().max() <= 0.02 * lin(x).float().abs().max())
    assert torch.equal(fast(x.repeat(1, 3, 1)), lin(x.repeat(1, 3, 1)))      # several rows: F.linear
    ckpt, _ = random_model("tiny", tiny_bpe)
    plain = build_model(ckpt, "bf16")
    kernel = build_model(ckpt, "bf16").fuse_projections()
    assert use_gemv_kernel(kernel) and isinstance(kernel.lm_head, GemvLinear)
    assert kernel.lm_head.weight is kernel.embed_tokens.weight              # still tied
    cfg = SamplingConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    with torch.no_grad():
        ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(9))
        plain.setup_cache(1, 32); kernel.setup_cache(1, 32)
        plain(ids, cache_pos=0); kernel(ids, cache_pos=0)
        a = plain(ids[:, :1], cache_pos=16).float()
        b = kernel(ids[:, :1], cache_pos=16).float()
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    assert len(list(generate_tokens(kernel, [[4, 5, 6]], cfg))) == 12

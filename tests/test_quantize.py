"""Weight-only int8 and int4: close to the dense model, and the same whichever kernel path runs."""
import pytest
import torch

from llamaforge.formats.load import build_model
from llamaforge.model.quantize import Int4Linear, Int8Linear, quantize_weights

from conftest import kernel_calls, random_model


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


@pytest.mark.parametrize("bits,tolerance", [(8, 0.1), (4, 0.25)])
def test_quantised_model_tracks_the_dense_model(bits, tolerance, tiny_bpe):
    ckpt, _ = random_model("tiny", tiny_bpe)
    dense = build_model(ckpt, "bf16")
    q = quantize_weights(build_model(ckpt, "bf16"), bits)
    assert isinstance(q.layers[0].mlp.up_proj, {8: Int8Linear, 4: Int4Linear}[bits])
    assert isinstance(q.lm_head, Int8Linear)      # the output projection stays int8 either way
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = dense(ids).float(), q(ids).float()
        one = q(ids[:, :1]).float()
    assert (a - b).abs().max() < tolerance * a.abs().max()
    assert (one[0, 0] - b[0, 0]).abs().max() < 0.05 * b.abs().max()   # kernel path at 1 row and 40 rows


def int4_weight(lin: Int4Linear) -> torch.Tensor:
    """The weight the int4 kernel computes with: multiply the identity."""
    eye = torch.eye(lin.in_features, dtype=torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, lin.weight, lin.group_size, lin.scales_and_zeros).T.float()


def test_int4_keeps_q4_1_blocks():
    """A Q4_1 weight (as llama.cpp's quantiser makes it) goes through int4 with no loss beyond
    rounding each block's scale and offset to bf16."""
    import gguf
    import numpy as np
    src = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)).numpy()
    qt = gguf.GGMLQuantizationType.Q4_1
    w = torch.from_numpy(np.array(gguf.quants.dequantize(gguf.quants.quantize(src, qt), qt))).float()
    got = int4_weight(Int4Linear(w, None, torch.bfloat16))
    block_range = w.view(64, 4, 32).amax(-1) - w.view(64, 4, 32).amin(-1)
    tol = (block_range.repeat_interleave(32, dim=1) * 2 ** -7 + w.abs() * 2 ** -7)
    assert ((got - w).abs() <= tol).all()
    # ... while a generic weight is only approximated to within half a level.
    g = torch.from_numpy(src)
    step = (g.view(64, 4, 32).amax(-1) - g.view(64, 4, 32).amin(-1)).repeat_interleave(32, dim=1) / 15
    err = (int4_weight(Int4Linear(g, None, torch.bfloat16)) - g).abs()
    assert (err <= step * 0.5 + g.abs() * 2 ** -7 + step * 2 ** -6).all() and err.max() > 1e-3


def test_auto_picks_int4_only_for_q4_1_weights_in_bf16(tiny_bpe, tmp_path):
    import llamaforge
    from llamaforge.formats import gguf as gguf_format
    ckpt, _ = random_model("tiny", tiny_bpe)
    gguf_format.save(ckpt, tmp_path / "q41.gguf", qtype="Q4_1")
    gguf_format.save(ckpt, tmp_path / "q8.gguf", qtype="Q8_0")

    def kind(path, dtype):
        model, _ = llamaforge.load(path, dtype=dtype, quantize="auto")
        return type(model.layers[0].mlp.up_proj).__name__
    assert kind(tmp_path / "q41.gguf", "bf16") == "Int4Linear"
    assert kind(tmp_path / "q41.gguf", "fp32") == "Linear"
    assert kind(tmp_path / "q8.gguf", "bf16") == "Linear"


def test_fusing_then_quantising_matches_quantising_alone(tiny_bpe):
    ckpt, _ = random_model("tiny", tiny_bpe)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    for bits in (4, 8):
        alone = quantize_weights(build_model(ckpt, "bf16"), bits)
        fused = quantize_weights(build_model(ckpt, "bf16").fuse_projections(), bits)
        assert type(fused.layers[0].self_attn.qkv_proj) is type(alone.layers[0].self_attn.q_proj)
        with torch.no_grad():
            for n in (1, 20):   # the decode kernel path and the prefill path
                a, b = alone(ids[:, :n]).float(), fused(ids[:, :n]).float()
                assert (a - b).abs().max() <= 0.02 * a.abs().max()


def test_int4_many_rows_multiply_the_int4_values():
    """Many-row inputs (prefill chunks) multiply the int4 values densely (not the weights they came
    from), so a request computes the same batched or alone, with or without a server's kept copy:
    on AMX tiles int4_dense_mm_amx dequantises them itself (no copy is kept), elsewhere a server
    keeps them in bf16."""
    from llamaforge.model.quantize import Int4Linear, int4_groups, int4_values_t
    w = torch.randn(64, 128) * 0.05
    layer = Int4Linear(w, None, torch.bfloat16, keep_dense=True)
    q, _, _ = int4_groups(w, 32)
    values_t = int4_values_t(q.to(torch.int32), layer.scales_and_zeros).bfloat16()   # (K, N)
    assert not torch.equal(values_t.t(), w.bfloat16()), "the int4 values should differ from the weights"
    if layer.amx:
        assert layer.dense_t is None
    else:
        assert torch.equal(layer.dense_t, values_t)
    dense_min_rows = layer.dense_min_rows   # 64, where AMX's decode kernel and PyTorch's take fewer
    x = torch.randn(dense_min_rows + 5, 128).bfloat16()                 # not a multiple of 16 rows
    one_by_one = torch.cat([layer(row[None]) for row in x])   # the decode kernel, a row at a time
    torch.testing.assert_close(layer(x).float(), one_by_one.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(layer(x).float(), (x.float() @ values_t.float()).bfloat16().float(), atol=2e-2, rtol=1e-2)
    plain = Int4Linear(w, None, torch.bfloat16)
    assert plain.dense_t is None
    if plain.unpacks:   # unpacked for the call or kept: the same product
        assert torch.equal(plain(x), layer(x))
    assert torch.equal(plain(x[:dense_min_rows - 1]), one_by_one[:dense_min_rows - 1])   # fewer: the int4 kernel
    if layer.amx:   # a row's result is its own (oneDNN, elsewhere, promises no such thing)
        assert torch.equal(layer(x)[:7], layer(x[:dense_min_rows])[:7])
        # A decode step (one position a row) of any batch: each row as alone.
        assert torch.equal(layer(x[:, None]).squeeze(1), one_by_one)


@pytest.mark.parametrize("rows,K,N", [(1, 64, 128), (16, 64, 128), (83, 576, 960), (48, 1536, 576), (21, 576, 192),
                                      (33, 576, 192), (40, 64, 128)])
def test_int4_dense_amx_kernel_is_the_product_of_the_unpacked_values(rows, K, N):
    """int4_dense_mm_amx: the fp32 product of x and the values int4pack_to_bf16_t unpacks, to bf16
    rounding, whatever the row count (rows past the last whole 16-row tile go in a tile of their
    own; 16 and 48 leave a single tile in the last pair), and each row's the same with fewer rows."""
    from llamaforge.model.kernels import int4_dense_mm_amx, int4pack_to_bf16_t
    g = torch.Generator().manual_seed(rows)
    layer = Int4Linear(torch.randn(N, K, generator=g) * 0.05, None, torch.bfloat16)
    if not layer.amx:
        pytest.skip("no AMX tiles here: many int4 rows take oneDNN's product")
    x = torch.randn(rows, K, generator=g).bfloat16()
    out = int4_dense_mm_amx(x, layer.weight, layer.scales_and_zeros)
    ref = x.float() @ int4pack_to_bf16_t(layer.weight, layer.scales_and_zeros, 32).float()
    assert out.shape == (rows, N) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=8e-3)
    fewer = max(1, rows // 3)
    assert torch.equal(int4_dense_mm_amx(x[:fewer].clone(), layer.weight, layer.scales_and_zeros), out[:fewer])


@pytest.mark.parametrize("shape", [(64, 96), (192, 576), (128, 1536)])
def test_int4_weights_unpack_to_the_values_the_int4_kernel_uses(shape):
    """Without a kept copy (where the CPU has no AMX tiles), a long input is multiplied by the
    layer's weights unpacked from PyTorch's int4 packing (the kernel reads that layout itself): the
    unpacked weights are the dense copy's, bit for bit, whatever the shape."""
    from llamaforge.model.kernels import int4pack_to_bf16_t
    from llamaforge.model.quantize import Int4Linear, int4_groups, int4_unpacking_available, int4_values_t
    if not int4_unpacking_available():
        pytest.skip("no AVX512-BF16 / kernel build / AVX-512 packing here: long inputs take PyTorch's int4 kernel")
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 0.05
    layer = Int4Linear(w, None, torch.bfloat16)
    assert layer.unpacks
    q, _, _ = int4_groups(w, 32)   # the values a kept copy holds (int4_values_t), and the AMX kernel dequantises to
    values_t = int4_values_t(q.to(torch.int32), layer.scales_and_zeros).bfloat16()
    assert torch.equal(int4pack_to_bf16_t(layer.weight, layer.scales_and_zeros, 32), values_t)
    assert not Int4Linear(torch.randn(96, 64), None, torch.bfloat16).unpacks   # not blocks of 64 rows


@pytest.mark.parametrize("shape", [(64, 96), (192, 576), (128, 1536)])
def test_int4_amx_kernel_computes_the_int4_product_each_row_alone(shape):
    """Where the CPU has AMX tiles, int4 inputs of a few rows (decode steps) take our kernel: the
    product with the int4 values to bf16 rounding, and each row's result bit for bit the same
    whatever other rows share its call (a request decodes alike alone or in a server's batch)."""
    from llamaforge.model.quantize import AMX_MAX_ROWS, Int4Linear, int4_groups, int4_values_t
    g = torch.Generator().manual_seed(shape[1])
    w = torch.randn(*shape, generator=g) * 0.05
    layer = Int4Linear(w, None, torch.bfloat16)
    if not layer.amx:
        pytest.skip("no AMX-BF16 here (or no kernel build): decode steps take PyTorch's int4 kernel")
    x = torch.randn(40, shape[1], generator=g).bfloat16()
    with kernel_calls() as calls:
        out = layer(x)
    assert calls == ["int4_mm_amx"] and out.dtype == torch.bfloat16 and out.shape == (40, shape[0])
    ref = x.float() @ int4_values_t(int4_groups(w)[0].int(), layer.scales_and_zeros)   # the int4 values, fp32
    torch.testing.assert_close(out.float(), ref, atol=1e-4 * ref.abs().max().item(), rtol=2 ** -8)
    for rows in (1, 3, 16, 17, 40):   # one tile of rows, several, and parts of one
        assert torch.equal(layer(x[:rows]), out[:rows])
    assert torch.equal(torch.cat([layer(row[None]) for row in x]), out)
    assert layer.dense_min_rows == AMX_MAX_ROWS


@pytest.mark.parametrize("rows", [1, 5, 16, 33])
def test_int8_amx_kernel_sums_exactly_each_row_alone(rows):
    """Where the CPU has AMX tiles, Int8Linear (the output projection) multiplies on them: each
    activation as three int8 digits, summed exactly in int32, so the logits are as close to the
    exact product as fp32 sums are, and a row's logits the same alone or batched (bit for bit)."""
    from llamaforge.model.quantize import Int8Linear
    g = torch.Generator().manual_seed(rows)
    layer = Int8Linear(torch.randn(96, 128, generator=g) * 0.05, None, torch.float32, tiles=True)
    if not layer.amx:
        pytest.skip("no AMX here (or no kernel build): the output projection takes gemv_int8")
    x = torch.randn(rows, 128, generator=g) * 3
    x[0, :64] *= 1e-3                       # small and large activations in one row
    with kernel_calls() as calls:
        out = layer(x)
    assert calls == ["int8_mm_amx"] and out.dtype == torch.float32 and out.shape == (rows, 96)
    exact = x.double() @ (layer.weight.double() * layer.scales.double()[:, None]).t()
    fp32 = x @ (layer.weight.float() * layer.scales[:, None]).t()
    assert (out.double() - exact).abs().max() <= 4 * (fp32.double() - exact).abs().max() + 1e-6
    assert torch.equal(torch.cat([layer(row[None]) for row in x]), out)
    assert layer(x[None]).shape == (1, rows, 96)                                     # leading dims kept
    assert layer(x[:0]).shape == (0, 96)                                              # no rows, no tiles
    bad = x.clone()
    bad[0, 5] = float("nan")
    assert layer(bad)[0].isnan().all() and not layer(bad)[1:].isnan().any()          # NaN stays NaN
    assert not Int8Linear(torch.randn(96, 128), None, torch.bfloat16).amx            # --quantize int8's layers

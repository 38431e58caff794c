"""The hand-written decode kernel (model/kernels.py) computes what PyTorch's matmul does."""
import pytest
import torch

from llamaforge.formats.load import build_model
from llamaforge.model.generation import SamplingConfig, generate_tokens
from llamaforge.model.kernels import GemvLinear, gemv_extension, use_gemv_kernel

from conftest import kernel_calls, random_model


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


def test_the_kernels_are_built_once_and_reused(tmp_path):
    """One build per machine, torch and Python, in a directory of its own: another process (here
    from another directory) loads it without building it again."""
    import subprocess
    import sys

    from llamaforge.model.kernels import _build_directory
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: llamaforge uses PyTorch's kernels")
    built = sorted(_build_directory().glob("*.so"))
    assert built
    stamp = built[0].stat().st_mtime_ns
    r = subprocess.run([sys.executable, "-c", "from llamaforge.model.kernels import gemv_extension\n"
                        "assert gemv_extension() is not None"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "loading the CPU decode kernels" in r.stderr and "building" not in r.stderr
    assert built[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("rows", [1, 3, 8, 13, 32])
def test_the_kernels_take_several_rows_and_read_each_weight_once(rows):
    """A batch's decode step: (M, K) activations, each weight row applied to all of them, in fp32.
    Odd sizes and a K that is not a multiple of 16 take the blocks' and the tail's paths."""
    from llamaforge.model.kernels import gemv_bf16, gemv_int8
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: llamaforge uses PyTorch's kernels")
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(70, 200, generator=g).bfloat16()
    x = torch.randn(rows, 200, generator=g)
    torch.testing.assert_close(gemv_bf16(w, x), x @ w.float().t(), atol=1e-4, rtol=1e-4)
    q = torch.randint(-128, 128, (70, 200), generator=g, dtype=torch.int8)
    scales = torch.rand(70, generator=g)
    torch.testing.assert_close(gemv_int8(q, scales, x), (x @ q.float().t()) * scales, atol=1e-3, rtol=1e-4)
    assert gemv_bf16(w, x[0]).shape == (70,)
    # Each output the same whatever else is in the batch: a request decodes alike alone or batched.
    for i in range(rows):
        assert torch.equal(gemv_bf16(w, x[i:i + 1]), gemv_bf16(w, x)[i:i + 1])
        assert torch.equal(gemv_int8(q, scales, x[i:i + 1]), gemv_int8(q, scales, x)[i:i + 1])


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_the_rms_norm_kernel_rounds_as_pytorch_does(rows):
    """x * rsqrt(mean(x^2) + eps) * w in fp32, rounded to bf16 once: F.rms_norm's value, up to
    the last bit of the mean's sum (summed in another order)."""
    import torch.nn.functional as F
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: llamaforge uses F.rms_norm")
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 3, 96, generator=g) * 3).bfloat16()
    w = (torch.randn(96, generator=g) * 0.5 + 1).bfloat16()
    ref, out = F.rms_norm(x, (96,), w, 1e-5), gemv_extension().rms_norm(x, w, 1e-5)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert (out != ref).float().mean() < 0.01                        # all but a rare rounding
    torch.testing.assert_close(out, ref, atol=0, rtol=2 ** -7)       # and those by one bf16 step


@pytest.mark.parametrize("rows", [1, 40])
def test_add_rms_norm_is_the_add_then_the_norm(rows):
    """The residual step and the next norm in one pass: x + r as PyTorch's bf16 add rounds it, and
    the rms_norm kernel of that sum, bit for bit; and KernelRMSNorm.add_and_norm takes it in
    inference only (with gradients: the add and F.rms_norm)."""
    from llamaforge.model.kernels import KernelRMSNorm
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: llamaforge adds and normalises with PyTorch's ops")
    g = torch.Generator().manual_seed(rows)
    x, r = ((torch.randn(rows, 3, 96, generator=g) * 3).bfloat16() for _ in range(2))
    w = (torch.randn(96, generator=g) * 0.5 + 1).bfloat16()
    total, normed = gemv_extension().add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(total, x + r)
    assert torch.equal(normed, gemv_extension().rms_norm(x + r, w, 1e-5))
    norm = KernelRMSNorm(96, 1e-5)
    norm.weight.data = w
    with torch.no_grad(), kernel_calls() as calls:
        a, b = norm.add_and_norm(x, r)
    assert "add_rms_norm" in calls and torch.equal(a, total) and torch.equal(b, normed)
    with kernel_calls() as calls:
        norm.add_and_norm(x, r)[1].float().sum().backward()
    assert not calls and norm.weight.grad is not None


def test_cpu_kernels_in_a_model_give_its_logits(tiny_bpe):
    """use_cpu_kernels: the norms' and the decode step's attention kernels change no logit beyond
    bf16 rounding, leave training (gradients) on PyTorch's ops, and decode as greedy decoding did."""
    from llamaforge.model.kernels import KernelRMSNorm, amx_available, use_cpu_kernels
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: llamaforge uses PyTorch's kernels")
    ckpt, _ = random_model("tiny", tiny_bpe)
    plain, kernel = build_model(ckpt, "bf16"), build_model(ckpt, "bf16")
    weight = kernel.norm.weight
    assert use_cpu_kernels(kernel)
    assert isinstance(kernel.norm, KernelRMSNorm) and kernel.norm.weight is weight   # the same parameter
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for m in (plain, kernel):
            m.setup_cache(2, 32)
        a = [plain(ids[:, :16], cache_pos=0)] + [plain(ids[:, t:t + 1], cache_pos=t) for t in range(16, 20)]
        with kernel_calls() as calls:
            b = [kernel(ids[:, :16], cache_pos=0)] + [kernel(ids[:, t:t + 1], cache_pos=t) for t in range(16, 20)]
    assert {"rms_norm", "add_rms_norm", "decode_attention"} <= set(calls)
    # The prefill's attention on tiles, where the heads' width suits them.
    assert ("prefill_attention_amx" in calls) == (amx_available() and kernel.config.head_dim % 32 == 0)
    for x, y in zip(a, b, strict=True):
        assert (x.float() - y.float()).abs().max() <= 0.03 * x.float().abs().max()
    kernel.clear_cache()
    with kernel_calls() as calls:
        loss = kernel(ids).float().logsumexp(-1).mean()   # with gradients: F.rms_norm and PyTorch's attention
        loss.backward()
    assert not calls
    assert kernel.norm.weight.grad is not None
    cfg = SamplingConfig(max_new_tokens=10, temperature=0, ignore_eos=True)
    with torch.no_grad():
        ref = [int(t) for t in generate_tokens(plain, [[4, 5, 6]], cfg)]
        out = [int(t) for t in generate_tokens(kernel, [[4, 5, 6]], cfg)]
    assert len(out) == 10 and sum(a == b for a, b in zip(ref, out, strict=True)) >= 8


def test_decode_attention_matches_sdpa_with_each_rows_length():
    """A server's decode step: each row attends to its own first lengths[b] positions of a slot
    cache view (strided rows, longer than any length), as SDPA with the step's mask does."""
    import torch.nn.functional as F

    from llamaforge.model.kernels import decode_attention
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: llamaforge uses SDPA with a mask")
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, D, max_len = 5, 3, 3, 64, 96
    cache_k = torch.randn(B, Hkv, max_len, D, generator=g).bfloat16()
    cache_v = torch.randn(B, Hkv, max_len, D, generator=g).bfloat16()
    lengths = torch.tensor([1, 7, 40, 64, 33])
    k, v = cache_k[:, :, :64], cache_v[:, :, :64]
    q = torch.randn(B, Hkv * G, 1, D, generator=g).bfloat16()
    mask = (torch.arange(64)[None] < lengths[:, None])[:, None, None]
    ref = F.scaled_dot_product_attention(q.float().reshape(B, Hkv, G, D), k.float(), v.float(), attn_mask=mask)
    out = decode_attention(q, k, v, lengths)
    assert out.shape == (B, Hkv * G, 1, D)
    torch.testing.assert_close(out.float(), ref.reshape(B, Hkv * G, 1, D), atol=1e-2, rtol=1e-2)
    assert decode_attention(q.float(), k.float(), v.float(), lengths) is None   # fp32: SDPA's


@pytest.mark.parametrize("kernel", ["decode_attention", "decode_attention_amx"])
@pytest.mark.parametrize("G,D", [(3, 64), (1, 128), (4, 96), (12, 64), (8, 32), (2, 256)])
def test_both_decode_attention_kernels_match_sdpa(kernel, G, D):
    """The AVX-512 and the AMX kernel, each against SDPA: lengths that end inside a block of 16 or
    32 keys or at its end, of one key, below 16 and past 64; every position (no lengths);
    dimensions 32-256, and query groups of 1-12 heads (the AMX kernel takes 8 at a time); NaN in
    the cache past each row's length (its values are read 16 keys at a time) changes nothing;
    each row alone gives the same bits as in the batch; lengths past the cache are refused."""
    import torch.nn.functional as F

    from llamaforge.model.kernels import amx_available
    if gemv_extension() is None or (kernel.endswith("amx") and not amx_available()):
        pytest.skip(f"no {kernel} here (AVX-512 / AMX-BF16 / compiler)")
    g = torch.Generator().manual_seed(G * D)
    B, Hkv, S = 4, 2, 90
    cache_k = torch.randn(B, Hkv, 128, D, generator=g).bfloat16()
    cache_v = torch.randn(B, Hkv, 128, D, generator=g).bfloat16()
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]
    q = torch.randn(B, Hkv, G, D, generator=g).bfloat16()
    run = getattr(gemv_extension(), kernel)
    for lengths in (torch.tensor([5, 17, 90, 47]), torch.tensor([1, 16, 32, 64]), None):
        mask = None if lengths is None else (torch.arange(S)[None] < lengths[:, None])[:, None, None]
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        past = cache_k.clone(), cache_v.clone()   # a cache past each row's length may hold anything
        for b, n in enumerate(lengths.tolist() if lengths is not None else [S] * B):
            past[0][b, :, n:], past[1][b, :, n:] = float("nan"), float("nan")
        out = run(q, past[0][:, :, :S], past[1][:, :, :S], torch.empty(0, dtype=torch.long) if lengths is None else lengths,
                  D ** -0.5)
        assert out.dtype == torch.bfloat16 and out.shape == (B, Hkv, G, D)
        torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
        if lengths is not None:   # each row computed alone: the same bits as in the batch
            for b in range(B):
                alone = run(q[b:b + 1], past[0][b:b + 1, :, :S], past[1][b:b + 1, :, :S], lengths[b:b + 1], D ** -0.5)
                assert torch.equal(alone, out[b:b + 1])
    with pytest.raises(RuntimeError, match="outside the cache"):
        run(q, k, v, torch.tensor([5, 17, S + 1, 47]), D ** -0.5)
    with pytest.raises(RuntimeError, match="one length a row"):
        run(q, k, v, torch.tensor([5]), D ** -0.5)


@pytest.mark.parametrize("G,D", [(3, 64), (1, 128), (5, 96), (16, 64)])
def test_prefill_attention_kernel_matches_causal_sdpa(G, D):
    """The AMX prefill kernel against causal SDPA in fp32: chunks of 1-70 queries after 0-200
    cached positions (lengths that end inside a block of 16 or 32 keys and inside a block of
    queries), keys and values as views of a longer cache, queries as a view of the stacked
    projection (non-contiguous), two sequences; and None for fp32 (then SDPA)."""
    import torch.nn.functional as F

    from llamaforge.model.kernels import amx_available, prefill_attention
    if gemv_extension() is None or not amx_available():
        pytest.skip("no AMX tiles here: prefill attention runs on SDPA")
    g = torch.Generator().manual_seed(G * D)
    B, Hkv = 2, 2
    for T, cached in ((1, 7), (17, 0), (70, 0), (33, 200), (5, 60)):
        S = cached + T
        cache = torch.randn(2, B, Hkv, S + 40, D, generator=g).bfloat16()
        k, v = cache[0, :, :, :S], cache[1, :, :, :S]
        qkv = torch.randn(B, T, Hkv * G + 2 * Hkv, D, generator=g).bfloat16()
        q = qkv[:, :, :Hkv * G].transpose(1, 2)                             # (B, H, T, D), strided
        mask = torch.ones(T, S, dtype=torch.bool).tril(cached)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
        out = prefill_attention(q, k, v)
        assert out.dtype == torch.bfloat16 and out.shape == (B, Hkv * G, T, D)
        torch.testing.assert_close(out.float(), ref, atol=1.5e-2, rtol=1e-2)
    assert prefill_attention(q.float(), k.float(), v.float()) is None


def test_cache_write_puts_each_rows_key_at_its_own_position():
    """A decode step's new keys and values into a server's cache, as index assignment would: only
    the rows that decode, each at its own position, from strided inputs (views of the stacked
    projection); out-of-range rows or positions refused before anything is written."""
    from llamaforge.model.kernels import cache_write
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: the engine uses index_copy_")
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 5, 3, 40, 64
    k_cache, v_cache = torch.randn(B, H, L, D, generator=g).bfloat16(), torch.randn(B, H, L, D, generator=g).bfloat16()
    qkv = torch.randn(B, 1, 9 + 2 * H, D, generator=g).bfloat16()
    k, v = qkv[:, :, 9:9 + H].transpose(1, 2), qkv[:, :, 9 + H:].transpose(1, 2)   # (B, H, 1, D), strided
    rows, at = torch.tensor([0, 2, 3]), torch.tensor([7, 0, 39])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k[rows, :, at], want_v[rows, :, at] = k[rows, :, 0], v[rows, :, 0]
    assert cache_write(k_cache, v_cache, k, v, rows, at)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    for bad_rows, bad_at in ((torch.tensor([5]), torch.tensor([0])), (torch.tensor([1]), torch.tensor([L]))):
        with pytest.raises(RuntimeError, match="out of range"):
            cache_write(k_cache, v_cache, k, v, bad_rows, bad_at)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    for t in (0, 2):   # one new key per row, no more, no fewer
        with pytest.raises(RuntimeError, match="cache_write"):
            cache_write(k_cache, v_cache, k.expand(B, H, t, D), v.expand(B, H, t, D), rows, at)


def test_silu_mul_kernel_rounds_once():
    """SwiGLU's silu(gate) * up in one pass: the fp32 value rounded to bf16 once (PyTorch's ops
    round twice, so they may differ by a step), for rows of any leading shape."""
    import torch.nn.functional as F
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: llamaforge uses chunk, silu and mul")
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(2, 3, 2 * 48, generator=g) * 4).bfloat16()
    gate, up = gate_up.float().chunk(2, dim=-1)
    exact = (F.silu(gate) * up).bfloat16()
    out = gemv_extension().silu_mul(gate_up)
    assert out.shape == (2, 3, 48) and out.dtype == torch.bfloat16
    assert (out != exact).float().mean() < 0.02                                 # all but a rare rounding
    torch.testing.assert_close(out, exact, atol=1e-6, rtol=2 ** -7)            # and those by one bf16 step


def test_rope_kernel_rotates_as_apply_rope():
    """RoPE of a stacked projection's q and k heads in one pass (the v heads after them left out):
    apply_rope's value in fp32 rounded once, for per-row positions (a server's batch) and one row
    of positions for all."""
    from llamaforge.model.config import LlamaConfig
    from llamaforge.model.llama import apply_rope, rope_cos_sin, rope_inv_freq
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: llamaforge uses apply_rope")
    g = torch.Generator().manual_seed(0)
    B, T, heads, D = 3, 5, 7, 64
    qkv = (torch.randn(B, T, heads + 2, D, generator=g) * 3).bfloat16()
    inv_freq = rope_inv_freq(LlamaConfig(dim=D * 2, n_heads=2, n_layers=1, vocab_size=8))
    for positions in (torch.randint(0, 4000, (B, T), generator=g), torch.arange(T)[None] + 100):
        cos, sin = rope_cos_sin(inv_freq, positions, torch.bfloat16)
        exact = apply_rope(qkv[:, :, :heads].transpose(1, 2).float(), cos.float(), sin.float()).bfloat16()
        out = gemv_extension().rope(qkv, cos, sin, heads).transpose(1, 2)
        assert out.shape == (B, heads, T, D)
        assert (out != exact).float().mean() < 0.02                              # all but a rare rounding
        torch.testing.assert_close(out, exact, atol=1e-6, rtol=2 ** -7)          # and those by one bf16 step


def test_stacked_projection_kernels_in_a_model(tiny_bpe):
    """Where q/k/v and gate/up are stacked (inference), use_cpu_kernels adds RoPE and silu * up in
    one pass each: a forward takes them and gives the same logits as PyTorch's ops."""
    from llamaforge.model.kernels import use_cpu_kernels
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: llamaforge uses PyTorch's ops")
    ckpt, _ = random_model("tiny", tiny_bpe, head_dim=32)   # heads 32 wide, as the kernel takes
    plain, kernel = build_model(ckpt, "bf16"), build_model(ckpt, "bf16")
    for m in (plain, kernel):
        m.fuse_projections()
    assert use_cpu_kernels(kernel)
    assert kernel.layers[0].self_attn.rope is not None and kernel.layers[0].mlp.silu_mul is not None
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), kernel_calls() as calls:
        a, b = plain(ids), kernel(ids)
    assert "rope" in calls and "silu_mul" in calls
    assert (a.float() - b.float()).abs().max() <= 0.03 * a.float().abs().max()


def test_cache_write_int8_rounds_as_quantize_kv():
    """An int8 cache's writes (`--kv-cache int8`): each (position, head)'s values as int8 with one
    scale, byte for byte quantize_kv's, for a decode step's rows at their own positions and for a
    prefill chunk of several positions; strided inputs (views of the stacked projection), a row of
    zeros kept zeros; out-of-range rows or positions refused."""
    from llamaforge.model.kernels import cache_write_int8, quantize_kv
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: no int8 cache")
    g = torch.Generator().manual_seed(1)
    B, H, L, D = 4, 3, 40, 64
    for T, rows, at in ((1, torch.tensor([0, 2, 3]), torch.tensor([7, 0, 39])), (9, torch.tensor([1, 3]), torch.tensor([0, 31]))):
        kc, vc = torch.zeros(B, H, L, D, dtype=torch.int8), torch.zeros(B, H, L, D, dtype=torch.int8)
        ks, vs = torch.zeros(B, H, L), torch.zeros(B, H, L)
        qkv = 3 * torch.randn(B, T, 9 + 2 * H, D, generator=g).bfloat16()
        qkv[1, 0, 9] = 0                                                              # a key of zeros
        k, v = qkv[:, :, 9:9 + H].transpose(1, 2), qkv[:, :, 9 + H:].transpose(1, 2)   # (B, H, T, D), strided
        cache_write_int8(kc, vc, ks, vs, k, v, rows, at)
        for r, p in zip(rows.tolist(), at.tolist(), strict=True):
            for cache, scale, new in ((kc, ks, k), (vc, vs, v)):
                q, s = quantize_kv(new[r])
                assert torch.equal(cache[r, :, p:p + T], q) and torch.equal(scale[r, :, p:p + T], s)
        untouched = torch.ones(B, L, dtype=torch.bool)
        for r, p in zip(rows.tolist(), at.tolist(), strict=True):
            untouched[r, p:p + T] = False
        assert not kc.transpose(1, 2)[untouched].any() and not ks.transpose(1, 2)[untouched].any()
    assert torch.equal(quantize_kv(torch.zeros(2, D))[0], torch.zeros(2, D, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="out of range"):
        cache_write_int8(kc, vc, ks, vs, k, v, torch.tensor([1]), torch.tensor([L - T + 1]))


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("G,D", [(3, 64), (2, 128), (6, 64), (3, 48)])
def test_int8_decode_attention_kernel(G, D, amx, monkeypatch):
    """The int8 cache's decode attention against the bf16 kernel over the same keys and values
    dequantised: close (on AMX tiles its queries and probabilities are rounded to int8 / u8 as
    well; the AVX-512 kernel, where there are no tiles, converts each key and value to fp32); each
    row over its own length, values past it never read (garbage there changes nothing); each row
    alone bit for bit as in the batch; more than 4 heads a group split; bad lengths refused."""
    from llamaforge.model import kernels
    from llamaforge.model.kernels import decode_attention, decode_attention_int8, dequantize_kv, quantize_kv
    if gemv_extension() is None or (amx and not kernels.amx_available()):
        pytest.skip("no AVX-512 / AMX tiles here")
    if amx and D % 64:
        pytest.skip("the AMX kernel takes head dimensions a multiple of 64 (the AVX-512 one the rest)")
    if not amx:
        monkeypatch.setattr(kernels, "_amx", False)
    g = torch.Generator().manual_seed(G * D)
    B, Hkv, L = 5, 2, 300
    lengths = torch.tensor([1, 16, 63, 200, 257])
    q = torch.randn(B, Hkv * G, 1, D, generator=g).bfloat16()
    k, ks = quantize_kv(torch.randn(B, Hkv, L, D, generator=g))
    v, vs = quantize_kv(torch.randn(B, Hkv, L, D, generator=g))
    out = decode_attention_int8(q, k, ks, v, vs, lengths)
    ref = decode_attention(q, dequantize_kv(k, ks, torch.bfloat16), dequantize_kv(v, vs, torch.bfloat16), lengths)
    assert out.shape == (B, Hkv * G, 1, D) and out.dtype == torch.bfloat16
    err = (out.float() - ref.float()).abs()
    assert err.mean() < 0.01 * ref.float().abs().mean() + 1e-3 and err.max() < 0.1
    for b in range(B):   # garbage past a row's length, and each row alone
        n = int(lengths[b])
        k2, v2, ks2, vs2 = k.clone(), v.clone(), ks.clone(), vs.clone()
        k2[b, :, n:], v2[b, :, n:], ks2[b, :, n:], vs2[b, :, n:] = 127, -127, 1e6, 1e6
        assert torch.equal(decode_attention_int8(q, k2, ks2, v2, vs2, lengths)[b], out[b])
        assert torch.equal(decode_attention_int8(q[b:b + 1], k[b:b + 1, :, :n], ks[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                                 vs[b:b + 1, :, :n])[0], out[b])
    with pytest.raises(RuntimeError, match="length"):
        decode_attention_int8(q, k, ks, v, vs, torch.tensor([1, 2, 3, 4, L + 1]))


def test_training_kernels_round_once_and_give_autograds_gradients():
    """Training's SwiGLU, RoPE and frozen-weight RMSNorm: forward values the fp32 result rounded once,
    gradients those of fp32 autograd within bf16's rounding."""
    import torch.nn.functional as F

    from llamaforge.model.kernels import _FrozenWeightRMSNorm, rope, swiglu
    from llamaforge.model.llama import apply_rope, rope_cos_sin
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: llamaforge trains with PyTorch's ops")
    g = torch.Generator().manual_seed(0)
    gate, up = ((torch.randn(2, 3, 48, generator=g) * s).bfloat16().requires_grad_() for s in (4, 1))
    grad = torch.randn(2, 3, 48, generator=g).bfloat16()
    x = (torch.randn(2, 3, 64, generator=g) * 3).bfloat16().requires_grad_()
    w = (1 + 0.2 * torch.randn(64, generator=g)).bfloat16()
    norm_grad = torch.randn(2, 3, 64, generator=g).bfloat16()
    heads = (torch.randn(2, 3, 4, 64, generator=g) * 2).bfloat16().requires_grad_()   # (B, T, heads, D)
    cos, sin = rope_cos_sin(1e4 ** -(torch.arange(0, 64, 2) / 64), torch.arange(5, 8)[None], torch.bfloat16)
    rope_grad = torch.randn(2, 3, 4, 64, generator=g).bfloat16()
    for ours, ref, inputs, dy in (
            (lambda a: rope(a, cos, sin, 4),
             lambda a: apply_rope(a.transpose(1, 2), cos.float(), sin.float()).transpose(1, 2), (heads,), rope_grad),
            (lambda a, b: swiglu(a, b), lambda a, b: F.silu(a) * b, (gate, up), grad),
            (lambda a: _FrozenWeightRMSNorm.apply(a, w, 1e-5), lambda a: F.rms_norm(a, (64,), w.float(), 1e-5),
             (x,), norm_grad)):
        exact = [t.detach().float().requires_grad_() for t in inputs]
        want = ref(*exact)
        want.backward(dy.float())
        out = ours(*inputs)
        out.backward(dy)
        assert out.dtype == torch.bfloat16 and (out != want.bfloat16()).float().mean() < 0.02
        torch.testing.assert_close(out.float(), want, atol=1e-6, rtol=2 ** -7)
        for t, e in zip(inputs, exact, strict=True):
            torch.testing.assert_close(t.grad.float(), e.grad, atol=2e-2 * e.grad.abs().max().item(), rtol=2 ** -7)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_kernels_in_a_model_give_its_gradients(tiny_bpe, method):
    """use_cpu_training_kernels: a bf16 training step runs SwiGLU and RoPE (forward and backward)
    through the kernel, and the norms too where their weight is frozen (LoRA; full fine-tuning trains them with
    PyTorch's ops); its loss and gradients are as near fp32's as PyTorch's bf16 ops are."""
    from llamaforge.model.adapters import LoRAConfig, add_lora
    from llamaforge.model.kernels import use_cpu_training_kernels
    if gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here: llamaforge trains with PyTorch's ops")
    ckpt, _ = random_model("tiny", tiny_bpe, n_heads=2, n_kv_heads=1, head_dim=32)   # heads of 32: the RoPE kernel takes them
    models = []
    for dtype in ("fp32", "bf16", "bf16"):
        m = build_model(ckpt, dtype)
        if method == "lora":
            torch.manual_seed(0)
            add_lora(m, LoRAConfig(rank=4, dropout=0.0, targets=["q_proj", "v_proj", "gate_proj", "down_proj"]))
            for name, p in m.named_parameters():
                if name.endswith("lora_B"):
                    torch.nn.init.normal_(p, std=0.02)   # B starts at zero: give A a gradient
        models.append(m)
    exact, plain, kernel = models
    assert use_cpu_training_kernels(kernel) and not use_cpu_training_kernels(exact)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    losses = []
    for m in models:
        with kernel_calls() as calls:
            loss = m(ids).float().logsumexp(-1).mean()
            loss.backward()
        losses.append(loss.item())
    assert {"swiglu", "swiglu_backward"} <= set(calls)
    assert ({"rms_norm", "rms_norm_backward"} <= set(calls)) == (method == "lora")
    # q and k, forward and backward (but the first layer's k under LoRA: nothing before it trains)
    assert calls.count("rope") == 2 * 2 * kernel.config.n_layers - (method == "lora")

    assert abs(losses[2] - losses[0]) <= 2 * abs(losses[1] - losses[0]) + 1e-3 * abs(losses[0])

    def grad_errors(m):   # each trained tensor's gradient's distance from fp32's, relative to its size
        return {n: float((p.grad.float() - q.grad).norm() / q.grad.norm())
                for (n, p), q in zip(m.named_parameters(), exact.parameters(), strict=True) if q.requires_grad}
    ours, theirs = grad_errors(kernel), grad_errors(plain)
    assert all(ours[n] <= 1.5 * theirs[n] + 0.02 for n in ours), \
        {n: (ours[n], theirs[n]) for n in ours if ours[n] > 1.5 * theirs[n] + 0.02}
    
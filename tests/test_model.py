"""The model against HF transformers' LlamaForCausalLM: logits, not "it runs"."""
import copy

import pytest
import torch

from llamaforge.formats.load import build_model
from llamaforge.model.llama import attention_mask

from conftest import random_model, randomize_parameters

CONFIGS = [
    ("tiny", {}),                                   # GQA, tied embeddings
    ("tiny-mha", {}),                               # multi-head, untied
    ("tiny-llama3", {}),                            # GQA, untied, Llama-3 rope scaling
    ("tiny-llama3", {"tie_embeddings": True}),      # Llama 3.2 style: scaling + tied
]


@pytest.mark.parametrize("preset,overrides", CONFIGS)
def test_logits_match_transformers(preset, overrides, tiny_bpe):
    ckpt, hf = random_model(preset, tiny_bpe, **overrides)
    ours = build_model(ckpt, "fp32")
    ids = torch.randint(0, ckpt.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, f"{preset}: max abs logit difference {diff}"


def test_rope_scaling_changes_logits(tiny_bpe):
    # Guards the test above: positions past original_max_position_embeddings must feel the scaling.
    ckpt, _ = random_model("tiny-llama3", tiny_bpe)
    scaled = build_model(ckpt, "fp32")
    ckpt.config.rope_scaling = None
    plain = build_model(ckpt, "fp32")
    ids = torch.randint(0, 512, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (scaled(ids) - plain(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama3"])
def test_kv_cache_decode_matches_full_forward(preset, tiny_bpe):
    ckpt, _ = random_model(preset, tiny_bpe)
    model = build_model(ckpt, "fp32")
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(2, 40)
        steps = [model(ids[:, :25], cache_pos=0)]
        steps.append(model(ids[:, 25:30], cache_pos=25))       # a chunk: needs the offset causal mask
        for t in range(30, 40):
            steps.append(model(ids[:, t:t + 1], cache_pos=t))
        model.clear_cache()
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


def test_left_padding_matches_unpadded(tiny_bpe):
    ckpt, hf = random_model("tiny", tiny_bpe)
    model = build_model(ckpt, "fp32")
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    valid = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], dim=1)
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(ids)
        batched = model(padded, pos, attention_mask(valid, 17, 0, 17))
        ref = hf(padded, attention_mask=valid.long(), position_ids=pos).logits
    assert (batched[:, 5:] - alone).abs().max() < 1e-4
    assert (batched[:, 5:] - ref[:, 5:]).abs().max() < 1e-4
    assert torch.isfinite(batched).all()


def test_bf16_close_to_fp32(tiny_bpe):
    ckpt, _ = random_model("tiny", tiny_bpe)
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = build_model(ckpt, "fp32")(ids)
        b = build_model(ckpt, "bf16")(ids)
    assert b.dtype == torch.bfloat16
    assert (a - b.float()).abs().max() < 0.1 * a.abs().max()


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha"])
def test_fused_projections_compute_the_same(preset, tiny_bpe):
    from llamaforge.model.generation import SamplingConfig, generate_tokens
    ckpt, _ = random_model(preset, tiny_bpe, attention_bias=True)
    plain = build_model(ckpt, "fp32")
    fused = build_model(ckpt, "fp32").fuse_projections()
    assert fused.layers[0].self_attn.q_proj is None and fused.layers[0].mlp.gate_up_proj is not None
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (plain(ids) - fused(ids)).abs().max() < 1e-5
    cfg = SamplingConfig(max_new_tokens=15, temperature=0, ignore_eos=True)
    assert [int(t) for t in generate_tokens(plain, [[4, 5, 6]], cfg)] == \
        [int(t) for t in generate_tokens(fused, [[4, 5, 6]], cfg)]


@pytest.mark.parametrize("H,Hkv,with_mask", [(4, 2, False), (4, 4, False), (6, 2, True)])
def test_training_attention_matches_sdpa_with_gradients(H, Hkv, with_mask):
    import torch.nn.functional as F

    from llamaforge.model.llama import attention_for_training, attention_mask
    torch.manual_seed(0)
    B, T, hd = 2, 7, 8
    q = torch.randn(B, H, T, hd, requires_grad=True)
    k = torch.randn(B, Hkv, T, hd, requires_grad=True)
    v = torch.randn(B, Hkv, T, hd, requires_grad=True)
    mask = attention_mask(torch.tensor([[1] * T, [0, 0] + [1] * (T - 2)], dtype=torch.bool), T, 0, T) if with_mask else None
    ours = attention_for_training(q, k, v, mask)
    g_ours = torch.autograd.grad(ours.sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=H != Hkv)
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    assert (ours - ref).abs().max() < 1e-5
    for a, b in zip(g_ours, g_ref, strict=True):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("H,Hkv,T,S,block", [(4, 2, 7, 7, 3), (4, 4, 9, 9, 4), (6, 2, 5, 12, 2), (6, 2, 16, 16, 64)])
def test_blocked_causal_attention_matches_sdpa(H, Hkv, T, S, block):
    """Inference attention in query blocks: the same as SDPA with a causal mask whose queries are
    the last T of S positions (a prompt after a cached prefix), for blocks that split T unevenly."""
    import torch.nn.functional as F

    from llamaforge.model.llama import causal_attention
    torch.manual_seed(0)
    B, hd = 2, 8
    q, k, v = torch.randn(B, H, T, hd), torch.randn(B, Hkv, S, hd), torch.randn(B, Hkv, S, hd)
    mask = attention_mask(None, T, S - T, S)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != Hkv)
    assert (causal_attention(q, k, v, block=block) - ref).abs().max() < 1e-5


def test_compiled_training_blocks_match_eager(tiny_bpe, monkeypatch):
    """`--compile` trains through torch.compile'd blocks: the same loss and LoRA gradients as the
    eager blocks (fp32), while evaluation and one-row batches stay eager."""
    from llamaforge.evaluate.lm import next_token_loss
    from llamaforge.model.adapters import LoRAConfig, add_lora
    ckpt, _ = random_model("tiny", tiny_bpe)
    models = []
    for _ in range(2):
        m = build_model(ckpt)
        torch.manual_seed(0)   # the same LoRA A in both
        add_lora(m, LoRAConfig(rank=4, alpha=8, dropout=0.0))
        randomize_parameters(m, 0.1)   # the same non-zero B in both
        models.append(m)
    eager, compiled = models
    compiled.compile_for_training()
    ids = torch.randint(3, 500, (3, 11), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 7:] = -100
    for m in models:
        next_token_loss(m, ids, labels)[0].backward()
    assert compiled.ran_compiled and not eager.ran_compiled   # what the trainer's compile marker reads
    loss_e, loss_c = (next_token_loss(m, ids, labels)[0].item() for m in models)
    assert abs(loss_e - loss_c) < 1e-5
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        if a.grad is not None:
            assert (a.grad - b.grad).abs().max() < 1e-4, n
    import llamaforge.model.llama as model_module
    calls = []
    real = model_module.compiled_block_forward()
    monkeypatch.setattr(model_module, "_compiled_block_forward", lambda *a: calls.append(1) or real(*a))
    compiled.ran_compiled = False
    with torch.no_grad():
        compiled(ids)
    next_token_loss(compiled, ids[:1], labels[:1])
    assert not calls and not compiled.ran_compiled
    next_token_loss(compiled, ids, labels)
    assert len(calls) == len(compiled.layers)
    # A copy trains its own weights through the shared compiled function.
    twin = copy.deepcopy(compiled)
    with torch.no_grad():
        twin.layers[0].mlp.down_proj.weight.add_(1.0)
    assert abs(next_token_loss(twin, ids, labels)[0].item() - loss_c) > 1e-3


def test_compile_without_a_cpp_compiler_is_one_clear_error(monkeypatch, tmp_path):
    """Without a compiler, or without Python's headers, --compile is one error naming what to
    install. Where it can build, torch.compile's code is cached under llamaforge's cache (kept
    across reboots), unless TORCHINDUCTOR_CACHE_DIR says where."""
    import os
    import shutil

    from llamaforge.errors import LlamaforgeError
    from llamaforge.model.kernels import prepare_compile
    monkeypatch.setenv("LLAMAFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")   # so that monkeypatch restores what was there
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    prepare_compile("--compile")   # this machine has one
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    prepare_compile("--compile")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
    import sysconfig
    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {**paths, "include": str(tmp_path)})   # no Python.h there
    with pytest.raises(LlamaforgeError, match="--compile needs Python's headers .*python3-dev"):
        prepare_compile("--compile")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(LlamaforgeError, match="--compile needs a C.. compiler"):
        prepare_compile("--compile")

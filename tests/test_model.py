"""The model against HF transformers' LlamaForCausalLM: logits, not "it runs"."""
import pytest
import torch

from llamaforge.loader import build_model
from llamaforge.model import attention_mask

from conftest import random_model

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
    from llamaforge.generate import SamplingConfig, generate_tokens
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

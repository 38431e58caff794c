"""Integration on the real default model, SmolLM2-135M-Instruct (Q4_1 GGUF), against transformers
reading the same file."""
import pytest
import torch

from llamaforge.formats import hf as hf_format
from llamaforge.formats.load import build_model
from llamaforge.model.generation import SamplingConfig, encode_prompt, generate_tokens

from conftest import hf_model_from_dir, kernel_calls, randomize_parameters

PROMPT = "The llama is a domesticated South American camelid. Llamas are social animals and"


def test_logits_match_transformers(default_checkpoint, hf_smollm2):
    model = build_model(default_checkpoint, "fp32")
    ids = torch.tensor([default_checkpoint.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        diff = (model(ids) - hf_smollm2[0](ids).logits).abs().max().item()
    print(f"\nSmolLM2-135M Q4_1, fp32: max abs logit difference vs transformers = {diff:.3g}")
    assert diff < 1e-4


def test_greedy_64_tokens_identical_to_transformers(default_checkpoint, hf_smollm2):
    tok = default_checkpoint.tokenizer
    model = build_model(default_checkpoint, "fp32")
    ids = encode_prompt(tok, "Write a short poem about mountains.", chat=True)
    cfg = SamplingConfig(max_new_tokens=64, temperature=0, ignore_eos=True)
    ours = [int(t) for t in generate_tokens(model, [ids], cfg)]
    ref = hf_smollm2[0].generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                 pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    assert ours == ref
    assert len(ours) == 64


def test_batch_generation_matches_single(default_checkpoint):
    tok = default_checkpoint.tokenizer
    model = build_model(default_checkpoint, "fp32")
    prompts = [encode_prompt(tok, p, chat=True) for p in ["What is 2+2?", "Name a colour of the sky on a clear day."]]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    batched = torch.stack(list(generate_tokens(model, prompts, cfg)), 1)
    for i, p in enumerate(prompts):
        assert batched[i].tolist() == [int(t) for t in generate_tokens(model, [p], cfg)]


def test_gguf_to_hf_export_keeps_logits(default_checkpoint, hf_smollm2, tmp_path):
    from transformers import AutoTokenizer
    hf_format.save(default_checkpoint, tmp_path / "hf")
    ref = hf_model_from_dir(tmp_path / "hf")
    ids = torch.tensor([default_checkpoint.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        assert (ref(ids).logits - hf_smollm2[0](ids).logits).abs().max() < 1e-4
    ref_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in [PROMPT, "Digits 12345 and 你好 🦙"]:
        assert ref_tok.encode(text) == default_checkpoint.tokenizer.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        default_checkpoint.tokenizer.apply_chat_template(msgs)


def test_fast_inference_paths_track_fp32(default_checkpoint):
    """The decode-time paths (dense bf16 with the decode kernel where it builds, int4, int8),
    stepped through the KV cache one token at a time, pick the fp32 model's next token."""
    import llamaforge
    tok = default_checkpoint.tokenizer
    ref = build_model(default_checkpoint, "fp32")
    prompt = encode_prompt(tok, "Write a short poem about mountains.", chat=True)
    cfg = SamplingConfig(max_new_tokens=24, temperature=0, ignore_eos=True)
    forced = [int(t) for t in generate_tokens(ref, [prompt], cfg)]
    for quantize in (None, "int4", "int8"):
        model, _ = llamaforge.load("default", dtype="bf16", quantize=quantize, inference=True)
        T = len(prompt)
        model.setup_cache(1, T + len(forced))
        with torch.no_grad():
            picks = [int(model(torch.tensor([prompt]), cache_pos=0, last_only=True)[0, -1].argmax())]
            for i, t in enumerate(forced[:-1]):   # teacher-forced: each step sees fp32's tokens
                picks.append(int(model(torch.tensor([[t]]), cache_pos=T + i)[0, -1].argmax()))
        agree = sum(a == b for a, b in zip(picks, forced, strict=True)) / len(forced)
        assert agree >= 0.9, (quantize, agree)


def test_bf16_blocked_prefill_tracks_fp32(default_checkpoint, monkeypatch):
    """bf16 prompts of 128+ tokens take the blocked causal attention (where SDPA is not the
    faster: without AMX), whole and after a cached prefix (as a chat's next turn does): on SmolLM2
    their logits are as close to fp32 as SDPA's, and SDPA's after a cached prefix (its mask) too."""
    import llamaforge.model.llama as model_module
    tok = default_checkpoint.tokenizer
    ids = torch.tensor([tok.encode(" ".join([PROMPT] * 20), add_special_tokens=False)[:300]])
    calls = []
    real = model_module.causal_attention
    monkeypatch.setattr(model_module, "causal_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(model_module, "sdpa_prefills_faster", lambda: False)   # the blocked path on any CPU
    with torch.no_grad():
        ref = build_model(default_checkpoint, "fp32")(ids)[0].float()
        assert not calls   # fp32 keeps SDPA
        bf16 = build_model(default_checkpoint, "bf16")
        blocked = bf16(ids)[0].float()
        bf16.setup_cache(1, 300)
        bf16(ids[:, :150], cache_pos=0)
        continued = bf16(ids[:, 150:], cache_pos=150)[0].float()
        assert len(calls) == 3 * bf16.config.n_layers   # per layer: whole, prefix, continuation
        monkeypatch.setattr(model_module, "sdpa_prefills_faster", lambda: True)   # SDPA (AMX's, without the tile kernel)
        sdpa = bf16(ids)[0].float()
        bf16(ids[:, :150], cache_pos=0)
        sdpa_continued = bf16(ids[:, 150:], cache_pos=150)[0].float()
        assert len(calls) == 3 * bf16.config.n_layers
    err_sdpa = (sdpa - ref).abs().mean()
    assert (blocked - ref).abs().mean() < 1.5 * err_sdpa
    assert (continued - ref[150:]).abs().mean() < 1.5 * err_sdpa
    assert (sdpa_continued - ref[150:]).abs().mean() < 1.5 * err_sdpa
    agree = (blocked.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > 0.9, agree


def test_amx_prefill_attention_tracks_fp32_as_sdpa_does(default_checkpoint):
    """On AMX tiles a prefill's attention is the kernel's (use_cpu_kernels), whole and after a
    cached prefix (a chat's next turn, a long prompt's second chunk): SmolLM2's bf16 logits over
    300 tokens are as close to fp32 as with SDPA, and their argmax agrees with fp32's as often
    (within 2 points)."""
    from llamaforge.model.kernels import amx_available, use_cpu_kernels
    if not amx_available():
        pytest.skip("no AMX tiles here: prefill attention runs on SDPA")
    tok = default_checkpoint.tokenizer
    ids = torch.tensor([tok.encode(" ".join([PROMPT] * 20), add_special_tokens=False)[:300]])
    with torch.no_grad():
        ref = build_model(default_checkpoint, "fp32")(ids)[0].float()
        bf16 = build_model(default_checkpoint, "bf16")
        assert use_cpu_kernels(bf16)
        bf16.setup_cache(1, 300)

        def whole_and_continued():
            whole = bf16(ids, cache_pos=0)[0].float()
            bf16(ids[:, :150], cache_pos=0)
            return whole, bf16(ids[:, 150:], cache_pos=150)[0].float()

        with kernel_calls() as calls:
            kernel, kernel_continued = whole_and_continued()
        assert calls.count("prefill_attention_amx") == 3 * bf16.config.n_layers
        for layer in bf16.layers:
            layer.self_attn.prefill_attention = None
        sdpa, sdpa_continued = whole_and_continued()
    err_sdpa = (sdpa - ref).abs().mean()
    assert (kernel - ref).abs().mean() < 1.2 * err_sdpa
    assert (kernel_continued - ref[150:]).abs().mean() < 1.2 * (sdpa_continued - ref[150:]).abs().mean()
    assert (kernel.argmax(-1) == ref.argmax(-1)).float().mean() >= (sdpa.argmax(-1) == ref.argmax(-1)).float().mean() - 0.02


def test_compiled_bf16_training_step_matches_eager(default_checkpoint):
    """`--compile` as users run it: SmolLM2 in bf16 with LoRA on every linear. One training step
    through torch.compile'd blocks is as close to fp32 (loss and LoRA gradients) as eager bf16."""
    from llamaforge.evaluate.lm import next_token_loss
    from llamaforge.model.adapters import LoRAConfig, add_lora
    tok = default_checkpoint.tokenizer
    ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=False)[:16],
                        tok.encode(PROMPT[::-1], add_special_tokens=False)[:16]])
    grads, losses = [], []
    for dtype, compiled in (("fp32", False), ("bf16", False), ("bf16", True)):
        model = build_model(default_checkpoint, dtype)
        torch.manual_seed(0)
        add_lora(model, LoRAConfig(rank=8, alpha=16, dropout=0.0))
        randomize_parameters(model, 0.02)   # a non-zero B, so the LoRA path counts in the forward too
        if compiled:
            model.compile_for_training()
        loss = next_token_loss(model, ids, ids)[0]
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if p.grad is not None]))
    (ref, eager, comp), (g_ref, g_eager, g_comp) = losses, grads
    assert abs(comp - ref) < 1.5 * abs(eager - ref) + 1e-3 * ref
    assert (g_comp - g_ref).norm() < 1.5 * (g_eager - g_ref).norm()

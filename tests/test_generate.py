"""Generation on tiny models: greedy equals transformers, batching changes nothing, each sampling
option does what it says."""
import pytest
import torch

from llamaforge.formats.load import build_model
from llamaforge.model.generation import SamplingConfig, generate, generate_tokens, sample, stream

from conftest import random_model


@pytest.fixture(scope="module")
def tiny(tiny_bpe):
    ckpt, twin = random_model("tiny-llama3", tiny_bpe, seed=3)
    return build_model(ckpt, "fp32"), twin, tiny_bpe


def greedy(model, prompts, n, **kw):
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, **kw)
    return torch.stack(list(generate_tokens(model, prompts, cfg)), dim=1)


def test_greedy_matches_transformers_generate(tiny):
    model, twin, _ = tiny
    prompt = [5, 17, 300, 42, 9]
    ours = greedy(model, [prompt], 30)[0].tolist()
    ref = twin.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, min_new_tokens=30,
                        pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref


def test_batch_equals_one_by_one(tiny):
    model, _, _ = tiny
    prompts = [[5, 17, 300, 42, 9], [7, 8], [100, 200, 300, 400, 500, 11, 12, 13]]
    batched = greedy(model, prompts, 20)
    for i, p in enumerate(prompts):
        assert batched[i].tolist() == greedy(model, [p], 20)[0].tolist()


def test_top_k_1_is_greedy_and_seed_is_reproducible(tiny):
    model, _, _ = tiny
    p = [[5, 17, 300]]
    a = torch.stack(list(generate_tokens(model, p, SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=1, top_p=None))), 1)
    assert a.tolist() == greedy(model, p, 10).tolist()
    cfg = SamplingConfig(max_new_tokens=15, temperature=1.0, top_p=None, seed=123)
    s1 = torch.stack(list(generate_tokens(model, p, cfg)), 1)
    s2 = torch.stack(list(generate_tokens(model, p, cfg)), 1)
    assert s1.tolist() == s2.tolist()
    assert s1.tolist() != greedy(model, p, 15).tolist()   # sampling at T=1 from a random model wanders


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = SamplingConfig(temperature=1.0, top_p=0.7)
    picks = {int(sample(logits, cfg, generator=torch.Generator().manual_seed(i))) for i in range(200)}
    assert picks == {0, 1}


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.07, 0.03]]))
    cfg = SamplingConfig(temperature=1.0, top_p=None, min_p=0.1)     # threshold 0.06
    picks = {int(sample(logits, cfg, generator=torch.Generator().manual_seed(i))) for i in range(300)}
    assert picks == {0, 1, 2}


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    seen = torch.tensor([[1, 2, 3, 3], [4, 5, 6, 7]])
    cfg = SamplingConfig(temperature=0, repetition_penalty=1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone()).argmax(-1)
    assert sample(logits, cfg, seen).tolist() == ref.tolist()
    # With a strong penalty the top token, once seen, is no longer chosen.
    top = logits.argmax(-1, keepdim=True)
    assert (sample(logits, SamplingConfig(temperature=0, repetition_penalty=100.0), top) != top[:, 0]).all()


def test_eos_stops_and_ignore_eos_does_not(tiny):
    model, _, tok = tiny
    prompt = [5, 17, 300, 42, 9]
    first = greedy(model, [prompt], 1)[0, 0].item()
    stopped = list(generate_tokens(model, [prompt], SamplingConfig(max_new_tokens=10, temperature=0), {first}))
    assert len(stopped) == 1
    cfg = SamplingConfig(max_new_tokens=10, temperature=0, ignore_eos=True)
    assert len(list(generate_tokens(model, [prompt], cfg, {first}))) == 10


def test_stop_strings_cut_streamed_and_whole_text(tiny):
    model, _, tok = tiny
    full = generate(model, tok, "the llama", temperature=0, max_new_tokens=24, ignore_eos=True)
    assert len(full) > 6
    stop = full[3:6]
    cut = full[:full.find(stop)]
    assert generate(model, tok, "the llama", temperature=0, max_new_tokens=24, ignore_eos=True, stop=[stop]) == cut
    ids = tok.encode("the llama")
    pieces = list(stream(model, tok, ids, SamplingConfig(max_new_tokens=24, temperature=0, ignore_eos=True, stop=[stop])))
    assert "".join(pieces) == cut


def test_prompt_longer_than_context_is_a_clear_error(tiny):
    from llamaforge.errors import LlamaforgeError
    model, _, _ = tiny
    with pytest.raises(LlamaforgeError, match="exceeds the context length"):
        list(generate_tokens(model, [[1] * 250], SamplingConfig(max_new_tokens=10)))


def test_compiled_decode_gives_the_same_tokens_without_recompiling(tiny):
    from torch._dynamo.utils import counters
    model, _, _ = tiny
    cfg = SamplingConfig(max_new_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 17, 300, 42, 9], [8, 9, 10]]
    eager = [[int(t) for t in generate_tokens(model, [p], cfg)] for p in prompts]
    compiled = [[int(t) for t in generate_tokens(model, [p], cfg, compile=True)] for p in prompts]
    frames = counters["stats"]["unique_graphs"]
    again = [int(t) for t in generate_tokens(model, [[1, 2, 3, 4, 5, 6, 7]], cfg, compile=True)]
    assert compiled == eager
    assert again == [int(t) for t in generate_tokens(model, [[1, 2, 3, 4, 5, 6, 7]], cfg)]
    assert counters["stats"]["unique_graphs"] == frames   # a new prompt length did not recompile


def test_reuse_cache_prefills_only_the_new_suffix(tiny, monkeypatch):
    import importlib
    gen = importlib.import_module("llamaforge.model.generation")   # the module, not the re-exported function
    model, _, _ = tiny
    prefilled = []
    real_prefill = gen.prefill

    def recording_prefill(model, input_ids, *args):
        prefilled.append(input_ids.shape[1])
        return real_prefill(model, input_ids, *args)
    monkeypatch.setattr(gen, "prefill", recording_prefill)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0, ignore_eos=True)

    def run(prompt, reuse=True):
        return [int(t) for t in generate_tokens(model, [prompt], cfg, reuse_cache=reuse)]
    first = [5, 17, 300, 42, 9]
    out1 = run(first)
    second = first + out1 + [77, 78, 79]
    out2 = run(second)
    assert prefilled[-1] == len(second) - (len(first) + len(out1) - 1)   # the last sampled token was never fed
    assert out2 == run(second, reuse=False)
    third = [5, 17, 1, 2, 3]                                               # shares two tokens with the cache
    other = run([9, 9, 9], reuse=False)                                    # ... not any more: overwritten
    out3 = run(third)
    assert prefilled[-1] == len(third) and out3 == run(third, reuse=False)
    run([5, 17, 1])                    # a prefix of what the cache holds: only its last token is recomputed
    assert prefilled[-1] == 1
    assert run(third) == out3 and prefilled[-1] == 2
    assert other == run([9, 9, 9], reuse=False)


def test_repetition_penalty_ignores_padding(tiny):
    model, _, _ = tiny
    cfg = SamplingConfig(max_new_tokens=10, temperature=0, repetition_penalty=1.5)
    prompts = [[5, 17], [100, 200, 300, 400, 500, 11, 12, 13]]
    batched = torch.stack(list(generate_tokens(model, prompts, cfg)), 1)
    for i, p in enumerate(prompts):
        assert batched[i].tolist() == [int(t) for t in generate_tokens(model, [p], cfg)]


@pytest.mark.parametrize("bad", [dict(repetition_penalty=0), dict(min_p=2), dict(top_k=0), dict(top_p=0),
                                 dict(temperature=-1), dict(max_new_tokens=0)])
def test_sampling_options_are_checked(bad):
    from llamaforge.errors import LlamaforgeError
    with pytest.raises(LlamaforgeError):
        SamplingConfig(**bad)


@pytest.mark.parametrize("path", ["bf16", "bf16 + kernel", "int8", "int4"])
def test_generation_sees_fp32_logits_in_every_dtype(tiny_bpe, path):
    """Prefill and decode steps return fp32 logits, the model's own output weights times the fp32
    hidden state: bf16 logits near 25 would move in steps of 0.125 and tie."""
    from llamaforge.model.generation import decode_one_token, prefill
    from llamaforge.model.kernels import gemv_extension, use_gemv_kernel
    from llamaforge.model.quantize import quantize_weights
    if path == "bf16 + kernel" and gemv_extension() is None:
        pytest.skip("no AVX-512 / compiler here")
    ckpt, _ = random_model("tiny", tiny_bpe, seed=5)
    model = build_model(ckpt, "bf16").fuse_projections()
    weight = model.output_weight.detach().float()   # what the output projection multiplies, in fp32
    if path == "bf16 + kernel":
        assert use_gemv_kernel(model)
    elif path in ("int8", "int4"):
        quantize_weights(model, bits=int(path[-1]))
        weight = model.lm_head.weight.float() * model.lm_head.scales.float()[:, None]   # its int8 values
    ids = torch.tensor([[5, 17, 300, 42, 9, 100]])
    model.setup_cache(1, 16)
    with torch.inference_mode():
        first = prefill(model, ids, torch.arange(6)[None], None)
        h = model.hidden_states(ids[:, -1:], cache_pos=6)[:, -1]
        step = decode_one_token(model, ids[:, -1:], torch.tensor([[6]]), 6, None)
    assert first.dtype == step.dtype == torch.float32
    exact = h.float() @ weight.T
    assert (step - exact).abs().max() <= 1e-4 * exact.abs().max()
    # Finer than bf16 could hold: the logits are not bf16 values cast up.
    assert not torch.equal(step, step.bfloat16().float())


def test_a_prompt_is_prefilled_in_chunks_to_the_same_logits(tiny_bpe):
    """prefill runs long prompts a chunk at a time (as a server does): each chunk attends to the
    cache the earlier ones filled, left padding masked in every chunk, the same logits as one pass."""
    from llamaforge.model.generation import prefill
    ckpt, _ = random_model("tiny", tiny_bpe, seed=7)
    model = build_model(ckpt, "fp32").eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 23), generator=g)
    key_valid = torch.ones(2, 23, dtype=torch.bool)
    key_valid[1, :6] = False                                          # row 1 is left-padded
    position_ids = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model.setup_cache(2, 32)
        whole = prefill(model, ids, position_ids, key_valid, chunk=1000)
        for chunk in (4, 7):
            model.setup_cache(2, 32)
            torch.testing.assert_close(prefill(model, ids, position_ids, key_valid, chunk=chunk), whole,
                                       atol=1e-5, rtol=1e-5)

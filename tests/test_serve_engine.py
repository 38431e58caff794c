"""The serving engine on a tiny random model, in-process: continuous batching gives each request
the tokens it gets alone, long prompts are prefilled in chunks between decode steps, a shared
prefix is not computed twice, a batch may mix LoRA adapters, the queue is bounded, a cancelled
request frees its slot, and constrained output always parses and matches its schema."""
import json
import threading
import time

import jsonschema
import pytest
import torch

from llamaforge.formats.load import build_model
from llamaforge.model.adapters import (
    AdapterRows,
    LoRAConfig,
    add_lora,
    add_served_adapter,
    merge_lora,
    save_peft_adapter,
)
from llamaforge.model.constrained import JSONConstraint
from llamaforge.model.generation import SamplingConfig, generate_tokens
from llamaforge.serve.engine import Engine, QueueFull, Request, Scheduler

from conftest import kernel_calls, random_model, randomize_parameters


@pytest.fixture(scope="module")
def tiny(tiny_bpe):
    ckpt, _ = random_model("tiny-llama3", tiny_bpe, seed=3)
    return ckpt, tiny_bpe


def inference_model(ckpt):
    model = build_model(ckpt, "fp32").eval()
    model.fuse_projections()
    return model


def int4_inference_model(tok, seed: int, head_dim: int):
    """A small random model as `serve` runs the default: bf16, int4 products, the CPU kernels."""
    from llamaforge.model.kernels import use_cpu_kernels
    from llamaforge.model.quantize import quantize_weights
    ckpt, _ = random_model("tiny-llama3", tok, seed=seed, dim=128, n_heads=4, n_kv_heads=2, head_dim=head_dim,
                           intermediate_size=256)
    model = quantize_weights(build_model(ckpt, "bf16").eval().fuse_projections(), bits=4)
    use_cpu_kernels(model)
    return model


class Outputs:
    """What a request receives, event by event."""

    def __init__(self):
        self.tokens, self.text, self.finish, self.error = [], "", None, None
        self.logprobs: list[float] = []
        self.done = threading.Event()
        self.at: list[float] = []

    def __call__(self, event):
        if event.token is not None:
            self.tokens.append(event.token)
            self.at.append(time.perf_counter())
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
        self.text += event.text
        if event.finish:
            self.finish, self.error = event.finish, event.error
            self.done.set()


def submit(engine, prompt, n, **kw) -> Outputs:
    out = Outputs()
    sampling = SamplingConfig(max_new_tokens=n, temperature=kw.pop("temperature", 0), ignore_eos=kw.pop("ignore_eos", True),
                              seed=kw.pop("seed", None))
    engine.submit(Request(list(prompt), sampling, out, **kw))
    return out


def wait(outputs, timeout=60):
    for o in outputs:
        assert o.done.wait(timeout), "a request did not finish"


def alone(model, prompt, n):
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, ignore_eos=True)
    with torch.inference_mode():
        return [int(t[0]) for t in generate_tokens(model, [prompt], cfg)]


def fed_tokens(monkeypatch, model) -> list[int]:
    """The tokens that each pass through `model` feeds from now on (0 for a pass of several rows)."""
    fed, hidden_states = [], type(model).hidden_states

    def counting(self, tokens, *args, **kw):
        fed.append(tokens.shape[1] if tokens.shape[0] == 1 else 0)
        return hidden_states(self, tokens, *args, **kw)
    monkeypatch.setattr(type(model), "hidden_states", counting)
    return fed


PROMPTS = [[5, 17, 300, 42, 9], [7, 8], list(range(100, 150)), [11] * 3, list(range(200, 237)), [400, 401]]


def test_continuous_batching_gives_each_request_its_tokens_alone(tiny):
    ckpt, tok = tiny
    model = inference_model(ckpt)
    engine = Engine(model, tok, max_batch=4, chunk=16)
    try:
        first = [submit(engine, p, 12) for p in PROMPTS[:3]]
        time.sleep(0.05)   # the rest join a running batch, and wait for slots
        rest = [submit(engine, p, 9 + i) for i, p in enumerate(PROMPTS[3:])]
        wait(first + rest)
    finally:
        engine.shutdown()
    for p, o, n in zip(PROMPTS, first + rest, [12, 12, 12, 9, 10, 11], strict=True):
        assert o.finish == "length" and o.tokens == alone(model, p, n)


def test_a_long_prompt_is_prefilled_between_decode_steps(tiny):
    ckpt, tok = tiny
    model = inference_model(ckpt)
    engine = Engine(model, tok, max_batch=2, chunk=8)
    try:
        short = submit(engine, [5, 6, 7], 40)
        while len(short.tokens) < 2:
            time.sleep(0.001)
        long = submit(engine, list(range(10, 130)), 4)   # 15 chunks of 8
        wait([short, long])
    finally:
        engine.shutdown()
    during = [t for t in short.at if t < long.at[0]]
    assert len(during) >= 2 + 14, "the short stream stalled while the long prompt was prefilled"
    assert long.tokens == alone(model, list(range(10, 130)), 4)


def test_short_prompts_share_a_steps_prefill_budget(tiny):
    """A step prefills as many whole chunks as fit in `prefill_tokens`, oldest request first, a
    shorter later prompt going where a longer one does not fit; every request still decodes what
    it would alone."""
    ckpt, tok = tiny
    model = inference_model(ckpt)
    engine = Engine(model, tok, max_batch=4, chunk=16, prefill_tokens=16, scheduler=Scheduler())
    engine.scheduler.shutdown("stepped by this test")
    prompts = [list(range(20, 26)), list(range(30, 42)), list(range(50, 57)), list(range(60, 100))]   # 6, 12, 7, 40
    outs = [Outputs() for _ in prompts]
    engine.waiting.extend(Request(p, SamplingConfig(max_new_tokens=3, temperature=0, ignore_eos=True), o)
                          for p, o in zip(prompts, outs, strict=True))
    cached = []
    while engine.busy:
        engine.admit()
        engine.step()
        cached.append([len(s.tokens) for s in engine.slots])
    # Step 1: 6 + 7 tokens (12 would not fit after 6); step 2: 12; steps 3-5: 16, 16, 8 of the 40.
    assert cached[0][:3] == [7, 0, 8] and cached[1][1] == 13 and cached[2][3] == 16 and cached[4][3] == 41
    for p, o in zip(prompts, outs, strict=True):
        assert o.tokens == alone(model, p, 3)


def test_prompts_share_a_prefill_pass_and_get_their_numbers_alone(tiny, monkeypatch):
    """Where every product computes a row alone (int4 layers and the int8 head on AMX tiles), the
    chunks of several prompts go through the model in one pass, each written to its own slot and
    attending to its own keys: each request gets the log-probability floats it gets with a pass
    of its own. A chunk shorter than the dense kernel's rows (which alone would take the decode
    kernel) still takes a pass of its own."""
    from llamaforge.model.kernels import amx_available
    from llamaforge.model.quantize import prefill_rows_alone
    if not amx_available():
        pytest.skip("no AMX tiles here: each prompt takes a pass of its own (prefill_rows_alone is None)")
    _, tok = tiny
    model = int4_inference_model(tok, seed=5, head_dim=32)
    assert prefill_rows_alone(model) == 48
    passes = fed_tokens(monkeypatch, model)
    # 120, 125, 128 tokens: chunks of 64, then 56, 61, 64 from position 64 of their slots; and 20.
    prompts = [list(range(10, 130)), list(range(130, 255)), list(range(260, 388)), list(range(400, 420))]

    def served(packs: bool):
        engine = Engine(model, tok, max_batch=4, chunk=64, prefill_tokens=256, scheduler=Scheduler())
        engine.scheduler.shutdown("stepped by this test")
        if not packs:
            engine.packs_from = None
        outs = [Outputs() for _ in prompts]
        engine.waiting.extend(Request(p, SamplingConfig(max_new_tokens=6, temperature=0, ignore_eos=True), o, logprobs=0)
                              for p, o in zip(prompts, outs, strict=True))
        steps = []   # each step's prefill passes (their tokens)
        with kernel_calls() as calls:
            while engine.busy:
                passes.clear()
                engine.admit()
                engine.step()
                steps.append(sorted(n for n in passes if n > 1))
        return outs, steps[:2], calls
    packed, steps, calls = served(True)
    assert steps == [[20, 192], [181]], "the longer prompts' chunks did not share a pass"
    assert {"int4_dense_mm_amx", "prefill_attention_amx"} <= set(calls)
    alone_outs, steps, _ = served(False)
    assert steps == [[20, 64, 64, 64], [56, 61, 64]]
    for a, b in zip(packed, alone_outs, strict=True):
        assert a.tokens == b.tokens and a.logprobs == b.logprobs and len(a.tokens) == 6


def test_a_step_prefills_at_most_a_few_prompts(tiny):
    """However short the prompts, a step runs at most PREFILLS_A_STEP prefill passes (each costs
    a pass over every layer), so the running streams wait about one step's prefill at most."""
    from llamaforge.serve.engine import PREFILLS_A_STEP
    ckpt, tok = tiny
    engine = Engine(inference_model(ckpt), tok, max_batch=PREFILLS_A_STEP + 2, chunk=64, scheduler=Scheduler())
    engine.scheduler.shutdown("stepped by this test")
    engine.waiting.extend(Request([7 + i, 8 + i], SamplingConfig(max_new_tokens=2, temperature=0, ignore_eos=True), Outputs())
                          for i in range(PREFILLS_A_STEP + 2))
    engine.admit()
    engine.step()
    assert sum(len(s.tokens) > 0 for s in engine.slots) == PREFILLS_A_STEP


def test_a_shared_prefix_is_not_computed_again(tiny, monkeypatch):
    ckpt, tok = tiny
    model = inference_model(ckpt)
    fed = fed_tokens(monkeypatch, model)
    engine = Engine(model, tok, max_batch=2, chunk=64)
    system = list(range(100, 140))
    try:
        wait([submit(engine, system + [7, 8], 3)])
        fed.clear()
        second = submit(engine, system + [9, 10, 11], 5)
        wait([second])
    finally:
        engine.shutdown()
    assert fed[0] == 3, f"the second prompt's prefill fed {fed[0]} tokens, not only the 3 after the shared 40"
    assert second.tokens == alone(model, system + [9, 10, 11], 5)


def test_one_batch_mixes_lora_adapters(tiny, tmp_path):
    ckpt, tok = tiny
    merged = []
    for seed in (1, 2):   # two adapters, saved as PEFT writes them, and each merged into a model
        model = build_model(ckpt, "fp32")
        cfg = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "gate_proj", "down_proj"])
        add_lora(model, cfg)
        randomize_parameters(model, 0.3, ("lora_B",), seed)
        (tmp_path / f"a{seed}").mkdir()
        save_peft_adapter(model, tmp_path / f"a{seed}", cfg, "CAUSAL_LM", hf_prefix="model.")
        merged.append(merge_lora(model).eval())
    base = inference_model(ckpt)
    rows = AdapterRows()
    for i in (1, 2):
        add_served_adapter(base, tmp_path / f"a{i}", i, rows)
    engine = Engine(base, tok, max_batch=4, adapter_rows=rows)
    try:
        outs = [submit(engine, PROMPTS[0], 10, adapter=a) for a in (0, 1, 2, 1)]
        wait(outs)
    finally:
        engine.shutdown()
    expected = [alone(inference_model(ckpt), PROMPTS[0], 10)] + [alone(m, PROMPTS[0], 10) for m in merged]
    assert expected[1] != expected[0] != expected[2], "the adapters should change the output"
    assert [o.tokens for o in outs] == [expected[0], expected[1], expected[2], expected[1]]


def hold(engine) -> threading.Event:
    """Stop the engine's loop between two steps until the returned event is set."""
    held, release = threading.Event(), threading.Event()
    engine.run_job(lambda: (held.set(), release.wait(30)), lambda result, error: None)
    assert held.wait(30)
    return release


def test_the_queue_is_bounded_and_a_cancelled_request_frees_its_slot(tiny):
    ckpt, tok = tiny
    engine = Engine(inference_model(ckpt), tok, max_batch=1, max_queue=1)
    try:
        running = submit(engine, [5, 6], 250)
        while not running.tokens:
            time.sleep(0.001)
        release = hold(engine)
        queued = submit(engine, [7, 8], 3)
        with pytest.raises(QueueFull):
            submit(engine, [9], 3)
        running_slot = engine.slots[0].request
        running_slot.cancelled = True   # what the server does when a client goes away
        release.set()
        wait([queued])
    finally:
        engine.shutdown()
    assert queued.finish == "length" and len(running.tokens) < 250 and not running.done.is_set()


def test_shutdown_ends_every_request_with_an_error(tiny):
    ckpt, tok = tiny
    engine = Engine(inference_model(ckpt), tok, max_batch=1, max_queue=4)
    outs = [submit(engine, [5, 6], 10_000) for _ in range(3)]
    while not outs[0].tokens:
        time.sleep(0.001)
    engine.shutdown("bye")
    assert all(o.finish == "error" and o.error == "bye" for o in outs)


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "mood": {"enum": ["happy", "sad", None, 3]},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3},
        "ok": {"type": "boolean"},
        "extra": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 4}]},
    },
    "required": ["name", "mood", "ok"],
    "$defs": {"tag": {"type": "string", "maxLength": 5}},
}


@pytest.mark.parametrize("seed", range(4))
def test_constrained_output_from_a_random_model_parses_and_matches(tiny, seed):
    """A random model left to itself writes noise; constrained, every sample is a valid object."""
    ckpt, tok = tiny
    engine = Engine(inference_model(ckpt), tok, max_batch=2)
    try:
        out = submit(engine, [5, 17, 300], 400, temperature=1.0, seed=seed, ignore_eos=False,
                     constraint=JSONConstraint(SCHEMA))
        wait([out])
    finally:
        engine.shutdown()
    assert out.finish == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMA)


@pytest.mark.parametrize("budget", [14, 30])
def test_constrained_output_short_of_tokens_still_parses(tiny, budget):
    """Near its max_tokens a generation writes the shortest ending: a random model sampling
    freely inside open strings still returns a whole object."""
    ckpt, tok = tiny
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "array", "items": {"type": "string"}}},
              "required": ["a", "b"]}
    engine = Engine(inference_model(ckpt), tok, max_batch=1)
    try:
        outs = [submit(engine, [5, 17, 300], budget, temperature=1.0, seed=seed, ignore_eos=False,
                       constraint=JSONConstraint(schema)) for seed in range(3)]
        wait(outs)
    finally:
        engine.shutdown()
    for out in outs:
        assert len(out.tokens) <= budget and out.finish == "stop"
        jsonschema.validate(json.loads(out.text), schema)


def test_compiled_single_sequence_step_gives_the_same_tokens(tiny):
    """--compile: one sequence's decode step runs through torch.compile, compiled once by warm_up
    (whichever slot it later decodes in), with the eager step's tokens."""
    import shutil
    if not shutil.which("g++"):
        pytest.skip("no C++ compiler for torch.compile")
    ckpt, tok = tiny
    model = inference_model(ckpt)
    engine = Engine(model, tok, max_batch=2, compile=True)
    try:
        engine.scheduler.call(engine.warm_up)
        first = submit(engine, PROMPTS[0], 10)
        wait([first])
        short, long = submit(engine, PROMPTS[1], 2), submit(engine, PROMPTS[2], 12)   # long ends alone, in slot 1
        wait([short, long])
    finally:
        engine.shutdown()
    assert first.tokens == alone(model, PROMPTS[0], 10) and long.tokens == alone(model, PROMPTS[2], 12)


def test_the_default_models_long_prompt_decodes_as_generate_does():
    """The server's SmolLM2 (int4 with a dense copy for prefill chunks) and generation's (int4,
    unpacked for a long input) take a prompt longer than a chunk in the same chunks and the same
    products: every token's log-probability is the same float, not only the greedy tokens (which
    agree for this prompt even when the two take other chunks). On AMX tiles both prefill with
    the tile kernels (int4_dense_mm_amx, prefill_attention_amx), and the server keeps no copy."""
    from llamaforge.formats.load import load
    from llamaforge.model.generation import PREFILL_CHUNK, decode_one_token, prefill
    from llamaforge.model.kernels import amx_available
    from llamaforge.model.quantize import Int4Linear, int4_unpacking_available
    if not int4_unpacking_available():
        pytest.skip("generation's long prompts take PyTorch's int4 kernel here, the server's its dense copy")
    served, _ = load("default", dtype="bf16", quantize="auto", inference=True, batched=True)
    plain, tok = load("default", dtype="bf16", quantize="auto", inference=True)
    text = " ".join(f"Story {i}: a fox named Pip found {i + 2} red stones by the river and hid them." for i in range(60))
    prompt = tok.encode(text)[:PREFILL_CHUNK + 44]   # a chunk and part of one
    assert len(prompt) == PREFILL_CHUNK + 44
    engine = Engine(served, tok, max_batch=2)
    try:
        with kernel_calls() as served_calls:
            out = submit(engine, prompt, 24, logprobs=0)
            wait([out])
    finally:
        engine.shutdown()
    tokens, logprobs = [], []
    with torch.inference_mode(), kernel_calls() as generated_calls:
        plain.setup_cache(1, len(prompt) + 24)
        logits = prefill(plain, torch.tensor([prompt]), None, None)
        for pos in range(len(prompt), len(prompt) + 24):
            token = int(logits[0].argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits[0].float(), -1)[token]))
            logits = decode_one_token(plain, torch.tensor([[token]]), None, pos, None)
    assert out.tokens == tokens
    assert out.logprobs == logprobs
    if amx_available():
        tiles = {"int4_dense_mm_amx", "prefill_attention_amx"}
        assert tiles <= set(served_calls) and tiles <= set(generated_calls)
        assert all(m.dense_t is None for m in served.modules() if isinstance(m, Int4Linear))


@pytest.mark.parametrize("kv_cache", ["bf16", "int8"])
def test_the_default_model_decodes_a_request_batched_as_alone_on_amx(monkeypatch, kv_cache):
    """On a CPU with AMX tiles every decode kernel computes a row alone (int4 products, the int8
    output projection, attention, the norms, RoPE, silu * up), and so does every prefill product
    from 48 rows: the real SmolLM2 server gives a request the same log-probability floats whether
    it runs alone or among 7 others of other lengths, its prompt prefilled in one pass with
    others', and the tile kernels are what ran. With `--kv-cache int8` too, where the request's
    tokens are also generate's with its own int8 cache."""
    from llamaforge.formats.load import load
    from llamaforge.model.kernels import Int8KVCache, amx_available, use_int8_kv_cache
    if not amx_available():
        pytest.skip("no AMX here: a batch's rows may round differently from one row alone (see test_serve's NEAR_TIE)")
    served, tok = load("default", dtype="bf16", quantize="auto", inference=True, batched=True)
    if kv_cache == "int8":
        use_int8_kv_cache(served)
    prompt = tok.encode("Once upon a time, a small fox named Pip lived by a river. One morning she found a map "
                        "under a stone, with a red cross drawn beside the old mill and a line of tiny footprints "
                        "leading up the hill. She folded it, tucked it under her paw and set off")
    others = [tok.encode(f"Story {i}: " + "the wind carried seeds over the hills. " * (i + 1)) for i in range(7)]
    assert len(prompt) >= 48 and sum(len(p) >= 48 for p in others) >= 2
    shared = []   # the prompts (their lengths) of each pass that packed several
    packed = Engine._prefill_packed
    monkeypatch.setattr(Engine, "_prefill_packed",
                        lambda self, slots: shared.append([len(s.request.prompt) for s in slots]) or packed(self, slots))
    running = []   # sequences in each step: the request did share its steps
    engine = Engine(served, tok, max_batch=8, scheduler=Scheduler(lambda n, waiting: running.append(n)))
    try:
        alone_out = submit(engine, prompt, 24, logprobs=0)
        wait([alone_out])
        running.clear()
        with kernel_calls() as calls:
            with engine.scheduler._wake:   # all 8 wait before the first step (a re-entrant lock), so they share it
                batch = [submit(engine, p, 24, logprobs=0) for p in others[:3]] + [submit(engine, prompt, 24, logprobs=0)] + \
                    [submit(engine, p, 24, logprobs=0) for p in others[3:]]
            wait(batch)
    finally:
        engine.shutdown()
    cache = {"bf16": {"decode_attention_amx", "cache_write"}, "int8": {"decode_attention_amx_int8", "cache_write_int8"}}
    assert max(running) == 8 and {"int4_mm_amx", "int8_mm_amx", "prefill_attention_amx", "int4_dense_mm_amx",
                                   *cache[kv_cache]} <= set(calls)
    assert not cache["bf16" if kv_cache == "int8" else "int8"] & set(calls)
    assert any(len(prompt) in lengths and len(lengths) > 1 for lengths in shared), shared
    assert batch[3].tokens == alone_out.tokens and batch[3].logprobs == alone_out.logprobs
    if kv_cache == "int8":
        assert alone_out.tokens == alone(served, prompt, 24)
        assert isinstance(served.layers[0].self_attn.kv_cache, Int8KVCache)


def test_an_int8_cache_serves_what_generate_makes_with_one(tiny):
    """`--kv-cache int8`: the server's cache holds int8 keys and values, and every request decodes
    the tokens that generate() makes with its own int8 cache, in a batch whose prompts share
    prefill passes, take several chunks, and decode side by side; refused with --compile, for a
    batch of prompts in generate, and where no kernel runs."""
    from llamaforge.errors import LlamaforgeError
    from llamaforge.model.kernels import Int8KVCache, amx_available, gemv_extension, use_int8_kv_cache
    _, tok = tiny
    model = int4_inference_model(tok, seed=6, head_dim=64)
    if gemv_extension() is None:
        with pytest.raises(LlamaforgeError, match="AVX-512"):
            use_int8_kv_cache(model)
        pytest.skip("no AVX-512 here: no int8 cache")
    if not amx_available():
        pytest.skip("no AMX tiles here: a batch's rows take other int4 kernels than a row alone")
    use_int8_kv_cache(model)
    prompts = [list(range(10, 130)), list(range(130, 185)), list(range(260, 388)), [400, 401, 402]]
    engine = Engine(model, tok, max_batch=4, chunk=64, prefill_tokens=256, scheduler=Scheduler())
    engine.scheduler.shutdown("stepped by this test")
    assert engine.cache.k[0].dtype == torch.int8 and engine.cache.k_scale[0].dtype == torch.float32
    outs = [Outputs() for _ in prompts]
    engine.waiting.extend(Request(p, SamplingConfig(max_new_tokens=8, temperature=0, ignore_eos=True), o, logprobs=0)
                          for p, o in zip(prompts, outs, strict=True))
    with kernel_calls() as calls:
        while engine.busy:
            engine.admit()
            engine.step()
    assert {"cache_write_int8", "decode_attention_amx_int8"} <= set(calls) and "decode_attention_amx" not in calls
    for p, o in zip(prompts, outs, strict=True):
        assert o.tokens == alone(model, p, 8)
    assert isinstance(model.layers[0].self_attn.kv_cache, Int8KVCache)   # generate's, in `alone`
    with pytest.raises(LlamaforgeError, match="compile"):
        Engine(model, tok, max_batch=2, compile=True)
    with pytest.raises(LlamaforgeError, match="one prompt"):
        alone_batch = SamplingConfig(max_new_tokens=2, temperature=0)
        list(generate_tokens(model, [[1, 2], [3, 4]], alone_batch))


def test_an_int8_cache_without_amx_tiles(tiny, monkeypatch):
    """Where the CPU has AVX-512 but no AMX tiles, the int8 cache's decode attention is the AVX-512
    kernel: a request served alone decodes generate's tokens with its own int8 cache."""
    from llamaforge.model import kernels
    if kernels.gemv_extension() is None:
        pytest.skip("no AVX-512 here: no int8 cache")
    monkeypatch.setattr(kernels, "_amx", False)
    _, tok = tiny
    model = int4_inference_model(tok, seed=8, head_dim=32)
    kernels.use_int8_kv_cache(model)
    engine = Engine(model, tok, max_batch=1, chunk=64, scheduler=Scheduler())
    engine.scheduler.shutdown("stepped by this test")
    out = Outputs()
    engine.waiting.append(Request(list(range(20, 110)), SamplingConfig(max_new_tokens=8, temperature=0, ignore_eos=True),
                                  out))
    with kernel_calls() as calls:
        while engine.busy:
            engine.admit()
            engine.step()
    assert "decode_attention_int8" in calls and "decode_attention_amx_int8" not in calls
    assert out.tokens == alone(model, list(range(20, 110)), 8)


def test_an_int8_cache_gives_a_one_token_chunk_generates_numbers(tiny):
    """With an int8 cache a prefill chunk of one token (a one-token prompt; a prompt whose other
    tokens a slot holds) attends through the decode kernel, as generate's Int8KVCache makes it
    attend, not through the prefill's attention: the same numbers, and the same tokens."""
    from llamaforge.model.kernels import amx_available, use_int8_kv_cache
    if not amx_available():
        pytest.skip("no AMX tiles here (the test follows the AMX kernels' names)")
    _, tok = tiny
    model = int4_inference_model(tok, seed=7, head_dim=64)
    use_int8_kv_cache(model)
    engine = Engine(model, tok, max_batch=2, chunk=64, scheduler=Scheduler())
    engine.scheduler.shutdown("stepped by this test")

    def served(prompt, n):
        out = Outputs()
        engine.waiting.append(Request(prompt, SamplingConfig(max_new_tokens=n, temperature=0, ignore_eos=True), out))
        engine.admit()
        with kernel_calls() as calls:
            engine.step()                 # the prompt's last chunk, and its first token
        while engine.busy:
            engine.admit()
            engine.step()
        return out, calls
    _, calls = served([42], 1)            # one token: a step that only prefills
    assert "decode_attention_amx_int8" in calls and "prefill_attention_amx" not in calls
    first, _ = served([42], 10)
    _, calls = served([42, *first.tokens[:3]], 1)        # all but its last token held by a slot
    assert "decode_attention_amx_int8" in calls and "prefill_attention_amx" not in calls
    again, _ = served([42, *first.tokens[:3]], 6)
    assert first.tokens == alone(model, [42], 10)
    assert again.tokens == alone(model, [42, *first.tokens[:3]], 6)

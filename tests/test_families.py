"""The Llama family as HF writes it: Qwen2 (q/k/v biases) and Mistral (sliding window), tiny
random models built with transformers' own classes. Loaded by llamaforge: the same logits and
greedy tokens; exported back: transformers' class of that family loads the same logits; a LoRA
run on a Qwen2 base is a PEFT adapter that peft applies to Qwen2ForCausalLM."""
import json
import threading

import pytest
import torch

from llamaforge.cli import main
from llamaforge.export import export
from llamaforge.formats.load import load
from llamaforge.model.generation import SamplingConfig, generate_tokens, prefill
from llamaforge.model.llama import WindowKVCache

SHAPE = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=160, max_position_embeddings=256)


def hf_family_model(family: str, out, tokenizer, **extra):
    """A random tiny model of transformers' class for the family, saved with the tiny tokenizer;
    biases and norms non-trivial, so a missing or misplaced one would show."""
    import transformers
    prefix = {"qwen2": "Qwen2", "mistral": "Mistral"}[family]
    config = getattr(transformers, prefix + "Config")(**SHAPE, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, prefix + "ForCausalLM")(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(out)
    tokenizer.save_hf(out)
    return model


@pytest.mark.parametrize("family, extra", [("qwen2", {"tie_word_embeddings": True, "rope_theta": 1e6}),
                                           ("mistral", {"sliding_window": None})])
def test_a_family_model_loads_generates_and_exports_as_itself(family, extra, tiny_bpe, tmp_path):
    from transformers import AutoModelForCausalLM
    theirs = hf_family_model(family, tmp_path / family, tiny_bpe, **extra)
    ours, _ = load(tmp_path / family, dtype="fp32")
    assert ours.config.arch == family and ours.config.qkv_bias == (family == "qwen2")
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        loaded = (ours(ids) - expected).abs().max().item()
        assert loaded < 1e-4
    prompt = [5, 17, 300, 42, 9]
    greedy = torch.stack(list(generate_tokens(ours, [prompt], SamplingConfig(max_new_tokens=20, temperature=0))), 1)
    ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                          pad_token_id=0)[0, len(prompt):]
    assert greedy[0].tolist() == ref.tolist()
    out = export(str(tmp_path / family), "hf", str(tmp_path / "exported"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [type(theirs).__name__]
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(back) is type(theirs)
    with torch.no_grad():
        exported = (back(input_ids=ids).logits - expected).abs().max().item()
        assert exported < 1e-4
    print(f"\n{family}: max |logit difference| against {type(theirs).__name__}, fp32: loaded {loaded:.1e}, "
          f"HF export read back {exported:.1e}; 20 greedy tokens equal")


def test_a_mistral_sliding_window_in_training_prefill_and_decoding(tiny_bpe, tmp_path):
    """A window of 16 positions over sequences of 40: the training forward (with its gradient
    path), a prefill and every decode step attend as MistralForCausalLM does."""
    from llamaforge.evaluate.lm import next_token_loss
    theirs = hf_family_model("mistral", tmp_path / "m", tiny_bpe, sliding_window=16)
    ours, _ = load(tmp_path / "m", dtype="fp32")
    assert ours.config.sliding_window == 16
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        windowed = (ours(ids) - expected).abs().max().item()
        assert windowed < 1e-4
        full = theirs.model.config.sliding_window
        theirs.model.config.sliding_window = None   # the window matters: without it, other logits
        assert (theirs(input_ids=ids).logits - expected).abs().max() > 1e-3
        theirs.model.config.sliding_window = full
    ours.train()
    loss, _ = next_token_loss(ours, ids, ids)
    reference = theirs(input_ids=ids, labels=ids).loss.item()
    assert loss.item() == pytest.approx(reference, abs=1e-5)
    print(f"\nmistral, window 16 over 40 positions: max |logit difference| {windowed:.1e}, training loss "
          f"{loss.item():.6f} against {reference:.6f}")
    ours.eval()
    prompt = [5, 17, 300, 42, 9, 11, 12, 13, 14, 15]
    greedy = torch.stack(list(generate_tokens(ours, [prompt], SamplingConfig(max_new_tokens=30, temperature=0))), 1)
    ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, min_new_tokens=30,
                          pad_token_id=0)[0, len(prompt):]
    assert greedy[0].tolist() == ref.tolist()
    # Generation kept only the window: a ring of 16 positions, not the 40 it went through.
    assert ours.layers[0].self_attn.kv_cache.k.shape[2] == 16
    # A prompt longer than the window, prefilled at once into the ring, and a batch (padded, with
    # the whole cache) agree with transformers too.
    long_prompt = list(range(60, 100))
    got = torch.stack(list(generate_tokens(ours, [long_prompt, prompt], SamplingConfig(max_new_tokens=12,
                                                                                        temperature=0))), 1)
    alone = torch.stack(list(generate_tokens(ours, [long_prompt], SamplingConfig(max_new_tokens=12, temperature=0))), 1)
    ref = theirs.generate(torch.tensor([long_prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                          pad_token_id=0)[0, len(long_prompt):]
    assert alone[0].tolist() == ref.tolist() == got[0].tolist()
    # In chunks, as generation takes a prompt longer than PREFILL_CHUNK: the ring carries the
    # window from one chunk to the next, to transformers' last logits.
    lp = torch.tensor([long_prompt])
    with torch.inference_mode():   # as generation runs (its cache was made in inference mode)
        want = theirs(input_ids=lp).logits[:, -1]
        for chunk in (7, 16, 40):
            ours.setup_cache(1, 64)
            assert isinstance(ours.layers[0].self_attn.kv_cache, WindowKVCache)
            assert (prefill(ours, lp, torch.arange(40)[None], None, chunk=chunk) - want).abs().max() < 1e-4
    # Through GGUF (written as llama with its window, as llama.cpp does) and back to HF: still
    # Mistral with its window.
    main(["export", str(tmp_path / "m"), "--to", "gguf", str(tmp_path / "w.gguf")])
    again, _ = load(tmp_path / "w.gguf", dtype="fp32")
    assert (again.config.arch, again.config.sliding_window) == ("mistral", 16)
    main(["export", str(tmp_path / "w.gguf"), "--to", "hf", str(tmp_path / "back")])
    assert json.loads((tmp_path / "back" / "config.json").read_text())["sliding_window"] == 16
    with torch.no_grad():
        assert (again(ids) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("family, arch", [("qwen2", "qwen2"), ("mistral", "llama")])
def test_gguf_of_a_family_as_llama_cpp_lays_it_out(family, arch, tiny_bpe, tmp_path):
    """Written as llama.cpp's converter writes the family (qwen2: its own architecture, Q/K rows
    as they are; Mistral: llama, rows permuted); transformers' GGUF reader, an independent one,
    and ours read it to the model's logits."""
    import gguf
    from transformers import AutoModelForCausalLM
    # (A directory not named after the family: transformers' GGUF reader takes a general.name
    # with "mistral" in it for a mistral architecture that gguf-py does not have.)
    theirs = hf_family_model(family, tmp_path / "model", tiny_bpe, tie_word_embeddings=family == "qwen2")
    main(["export", str(tmp_path / "model"), "--to", "gguf", str(tmp_path / "m.gguf")])
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
    assert ("blk.0.attn_q.bias" in {t.name for t in reader.tensors}) == (family == "qwen2")
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        independent = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
        by_transformers = (independent(input_ids=ids).logits - expected).abs().max().item()
        ours, _ = load(tmp_path / "m.gguf", dtype="fp32")
        by_us = (ours(ids) - expected).abs().max().item()
        assert by_transformers < 1e-4 and by_us < 1e-4
    print(f"\n{family} GGUF ({arch}, F32): max |logit difference| read by transformers {by_transformers:.1e}, "
          f"by llamaforge {by_us:.1e}")
    assert ours.config.arch == ("qwen2" if family == "qwen2" else "llama")


def test_a_lora_run_on_a_qwen2_base_is_a_peft_adapter_for_it(tiny_bpe, tmp_path, capsys):
    from peft import PeftModel
    from test_sft import chat_rows, write_jsonl
    from transformers import Qwen2ForCausalLM

    from conftest import peft_agreement
    hf_family_model("qwen2", tmp_path / "q", tiny_bpe, tie_word_embeddings=True)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(48))
    out = tmp_path / "run"
    main(["finetune", "sft", "--train", str(train), "--dev", str(train), "--out", str(out), "--model",
          str(tmp_path / "q"), "--dtype", "fp32", "--batch-size", "8", "--lr", "1e-2", "--max-steps", "6",
          "--lora-targets", "q_proj,k_proj,v_proj,o_proj"])
    capsys.readouterr()
    ours, _ = load(out, dtype="fp32")
    theirs = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32),
                                       str(out / "best")).eval()
    diff, moved = peft_agreement(ours, theirs, Qwen2ForCausalLM.from_pretrained(str(tmp_path / "q")).eval())
    assert diff < 1e-4 and moved > 1e-3


def test_a_qwen2_classifier_run_is_a_peft_adapter_for_qwen2_sequence_classification(tiny_bpe, tmp_path, capsys):
    from peft import PeftModel
    from transformers import Qwen2ForSequenceClassification

    from llamaforge.train.classify import predict_classifier

    from conftest import sentiment_file
    hf_family_model("qwen2", tmp_path / "q", tiny_bpe, tie_word_embeddings=True)
    out = tmp_path / "clf"
    main(["finetune", "classify", "--model", str(tmp_path / "q"), "--train", str(sentiment_file("train")),
          "--dev", str(sentiment_file("dev")), "--out", str(out), "--batch-size", "16", "--dtype", "fp32",
          "--max-steps", "6", "--lr", "3e-3", "--lora-rank", "4"])
    capsys.readouterr()
    texts = ["The soup was cold and bland.", "Wonderful service, we will come back!"]
    ours = predict_classifier(out, texts=texts, dtype="fp32")
    base = Qwen2ForSequenceClassification.from_pretrained(str(tmp_path / "q"), num_labels=2, pad_token_id=0,
                                                          dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, str(out / "best")).eval()
    with torch.no_grad():
        for text, o in zip(texts, ours, strict=True):
            p = theirs(input_ids=torch.tensor([tiny_bpe.encode(text)])).logits.softmax(-1)[0].tolist()
            assert [o["p_negative"], o["p_positive"]] == pytest.approx(p, abs=1e-4)
    main(["export", str(out), "--to", "hf", str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "Qwen2ForSequenceClassification"]


def test_serving_a_qwen2_model_gives_each_request_its_tokens_alone(tiny_bpe, tmp_path):
    """The server's engine over a Qwen2 model (q, k and v fused with their biases), in fp32 so that
    a batch's rows compute exactly what one row alone does."""
    from llamaforge.serve.engine import Engine, Request
    hf_family_model("qwen2", tmp_path / "q", tiny_bpe, tie_word_embeddings=True)
    model, tok = load(tmp_path / "q", dtype="fp32", inference=True, batched=True)
    assert model.layers[0].self_attn.qkv_proj.bias is not None
    prompts = [[5, 17, 300, 42, 9], list(range(100, 140)), [7, 8]]
    alone = []
    with torch.inference_mode():
        for p in prompts:
            cfg = SamplingConfig(max_new_tokens=10, temperature=0, ignore_eos=True)
            alone.append([int(t[0]) for t in generate_tokens(model, [p], cfg)])
    got = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def emit(i):
        def on(event):
            if event.token is not None:
                got[i].append(event.token)
            if event.finish:
                done[i].set()
        return on
    engine = Engine(model, tok, max_batch=4)
    try:
        for i, p in enumerate(prompts):
            engine.submit(Request(list(p), SamplingConfig(max_new_tokens=10, temperature=0, ignore_eos=True), emit(i)))
        assert all(d.wait(60) for d in done)
    finally:
        engine.shutdown()
    assert got == alone


def test_dpo_on_a_qwen2_base(tiny_bpe, tmp_path, capsys):
    hf_family_model("qwen2", tmp_path / "q", tiny_bpe, tie_word_embeddings=True)
    pairs = [{"prompt": f"question {i}", "chosen": "the answer is always llama", "rejected": f"maybe {i}"}
             for i in range(16)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    main(["finetune", "dpo", "--train", str(data), "--dev", str(data), "--model", str(tmp_path / "q"), "--dtype",
          "fp32", "--batch-size", "4", "--max-steps", "8", "--lr", "1e-2", "--out", str(tmp_path / "dpo")])
    final = json.loads(capsys.readouterr().out)
    assert final["loss"] < 0.69 and final["accuracy"] > 0.5   # below log 2: it learned the preference

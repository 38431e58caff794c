"""Instruction fine-tuning: data shapes, the assistant-only loss mask, packing, the three methods,
run directories as models, PEFT interoperability."""
import json
import math

import pytest
import torch

from llamaforge.cli import main
from llamaforge.data.batching import IGNORE, pack_rows, packed_batch, pad_labelled
from llamaforge.data.conversations import Example, encode_example, encode_examples, read_examples
from llamaforge.errors import LlamaforgeError
from llamaforge.evaluate.lm import next_token_loss
from llamaforge.formats.load import build_model, load

from conftest import random_model

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is a llama?"},
                {"role": "assistant", "content": "A South American camelid."},
                {"role": "user", "content": "And an alpaca?"},
                {"role": "assistant", "content": "Its smaller cousin."}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n, seed=0):
    """Conversations with one right answer: something even a tiny random model learns quickly."""
    g = torch.Generator().manual_seed(seed)
    return [{"messages": [{"role": "user", "content": f"question {int(torch.randint(1000, (1,), generator=g))}"},
                          {"role": "assistant", "content": "the answer is always llama"}]} for _ in range(n)]


def labelled_text(tok, ids, labels):
    return tok.decode([t for t, y in zip(ids, labels, strict=True) if y != IGNORE])


# --- the mask ------------------------------------------------------------------------------------

def test_chat_mask_covers_exactly_the_assistant_turns(tiny_bpe):
    ids, labels = encode_example(tiny_bpe, Example("x:1", messages=CONVERSATION))
    assert len(ids) == len(labels)
    # The scored tokens are the two replies, each with its end-of-turn marker, and nothing else.
    assert labelled_text(tiny_bpe, ids, labels) == "A South American camelid.<|im_end|>\nIts smaller cousin.<|im_end|>\n"
    # The whole sequence is the rendered conversation.
    assert tiny_bpe.decode(ids) == tiny_bpe.apply_chat_template(CONVERSATION, add_generation_prompt=False)


def test_chat_mask_with_the_real_smollm2_template(default_checkpoint):
    tok = default_checkpoint.tokenizer
    ids, labels = encode_example(tok, Example("x:1", messages=CONVERSATION))
    assert labelled_text(tok, ids, labels) == "A South American camelid.<|im_end|>\nIts smaller cousin.<|im_end|>\n"
    whole = tok.encode(tok.apply_chat_template(CONVERSATION, add_generation_prompt=False), add_special_tokens=False)
    assert ids == whole   # tokenizing piece by piece changes nothing


def test_mask_with_a_sentencepiece_tokenizer_keeps_inference_tokens(spm_model):
    """SentencePiece puts "▁" before every separately tokenized piece: the ids must be those of
    the whole rendered conversation, as inference sees it."""
    from llamaforge.text.convert import from_sentencepiece_model
    tok = from_sentencepiece_model(spm_model)
    ids, labels = encode_example(tok, Example("x:1", messages=CONVERSATION))
    assert ids == tok.encode(tok.apply_chat_template(CONVERSATION, add_generation_prompt=False), add_special_tokens=False)
    assert "camelid" in labelled_text(tok, ids, labels) and "llama" not in labelled_text(tok, ids, labels)


def test_alpaca_and_completion_shapes(tiny_bpe, tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Name it.", "input": "a camelid", "output": "llama"},
                                  {"instruction": "Say hi.", "input": "", "output": "hi"}]))
    a, b = read_examples(alpaca)
    assert a.messages[0] == {"role": "user", "content": "Name it.\n\na camelid"}
    assert b.messages == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    comp = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "The capital of Peru is", "completion": " Lima."}])
    (ex,) = read_examples(comp)
    ids, labels = encode_example(tiny_bpe, ex)
    assert labelled_text(tiny_bpe, ids, labels) == " Lima.<|im_end|>"   # the completion, then EOS
    assert tiny_bpe.decode([t for t, y in zip(ids, labels, strict=True) if y == IGNORE]) == "The capital of Peru is"


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]', "bad.jsonl:1: invalid JSON"),
    ('{"instruction": "x"}', "cannot tell the format"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "message 1 needs a role"),
    ('{"prompt": "x", "completion": 3}', "'completion' must be a string"),
    ("", "empty"),
])
def test_bad_instruction_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content + ("\n" if content else ""))
    with pytest.raises(LlamaforgeError) as e:
        read_examples(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_missing_field_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", chat_rows(2) + [{"instruction": "x", "output": "y"}, {"prompt": "only"}])
    with pytest.raises(LlamaforgeError, match=r"x\.jsonl:4: cannot tell"):
        read_examples(path)
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "completion": "b"}] * 2 + [{"prompt": "only"}])
    with pytest.raises(LlamaforgeError, match=r"c\.jsonl:3: missing field 'completion'"):
        read_examples(path, "completion")


def test_longer_than_the_context_is_an_error(tiny_bpe, tmp_path):
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "long.jsonl", chat_rows(2) + [long])
    with pytest.raises(LlamaforgeError, match=r"long\.jsonl:3: \d+ tokens, longer than the model's context of 256"):
        encode_examples(tiny_bpe, read_examples(path), max_length=128, context=256)


# --- packing -------------------------------------------------------------------------------------

def test_pack_rows_places_every_example_once():
    lengths = [int(x) for x in torch.randint(1, 60, (300,), generator=torch.Generator().manual_seed(0))]
    rows = pack_rows(lengths, 64, torch.Generator().manual_seed(1))
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert sum(lengths) / (64 * len(rows)) > 0.9   # rows are nearly full


def test_packed_rows_compute_what_each_example_computes_alone(tiny_bpe):
    ckpt, _ = random_model("tiny", tiny_bpe)
    model = build_model(ckpt, "fp32")
    pairs = [encode_example(tiny_bpe, Example("x", messages=r["messages"])) for r in chat_rows(7)]
    pairs.append(encode_example(tiny_bpe, Example("x", messages=CONVERSATION)))
    rows = [[0, 1, 2], [3, 7], [4, 5, 6]]
    ids, labels, pos, mask = packed_batch(pairs, rows, tiny_bpe.pad_id)
    with torch.no_grad():
        packed, n = next_token_loss(model, ids, labels, pos, mask, reduction="sum")
        alone = [next_token_loss(model, *pad_labelled([p], tiny_bpe.pad_id), reduction="sum") for p in pairs]
    assert n == sum(k for _, k in alone)
    assert float(packed) == pytest.approx(sum(float(loss) for loss, _ in alone), rel=1e-5)


# --- training runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    return write_jsonl(d / "train.jsonl", chat_rows(96)), write_jsonl(d / "dev.jsonl", chat_rows(16, seed=1))


def run_sft(out, model, train, dev, *flags):
    main(["finetune", "sft", "--train", str(train), "--dev", str(dev), "--out", str(out), "--model", str(model),
          "--dtype", "fp32", "--batch-size", "8", "--seed", "0", "--samples", "3", *flags])
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("method, lr", [("lora", "1e-2"), ("full", "3e-3"), ("prefix", "3e-1")])
def test_sft_learns_and_the_run_is_a_model(method, lr, tiny_model_dir, chat_data, tmp_path, capsys, monkeypatch):
    import io
    out = tmp_path / method
    pack = ["--pack", "--batch-size", "1"] if method == "full" else []
    metrics = run_sft(out, tiny_model_dir, *chat_data, "--method", method, "--lr", lr, "--epochs", "3",
                      "--eval-every", "4", *pack)
    printed = json.loads(capsys.readouterr().out)
    losses = [e["loss"] for e in metrics["evals"]]
    assert losses[-1] < losses[0] - 0.1, losses                     # it learned ...
    if method != "prefix":   # (a prefix moves a random tiny model too little to change its replies)
        last = (out / "samples.log").read_text().split("=== dev loss")[-1]
        assert last.count("reply:     the answer is always llama\n") == 3   # ... what it was taught
        # ... and chats with it at once, with the run directory as the model.
        monkeypatch.setattr("sys.stdin", io.StringIO("question 5\n"))
        main(["chat", "--model", str(out), "--temperature", "0", "--dtype", "fp32"])
        assert capsys.readouterr().out == "the answer is always llama\n"
    assert math.isclose(printed["perplexity"], math.exp(printed["loss"]))
    # The run directory is a model: read back, it scores what training recorded for the best step.
    assert printed["loss"] == pytest.approx(min(losses), rel=1e-4)
    files = {p.name for p in (out / "best").iterdir()}
    expected = {"lora": {"adapter_config.json", "adapter_model.safetensors"},
                "prefix": {"prefix_config.json", "prefix.safetensors"}}.get(method, {"config.json", "model.safetensors"})
    assert expected <= files


def test_lora_run_loads_in_peft_to_the_same_logits(tiny_model_dir, chat_data, tmp_path, capsys):
    from peft import PeftModel

    from conftest import hf_model_from_dir, peft_agreement
    out = tmp_path / "lora"
    run_sft(out, tiny_model_dir, *chat_data, "--method", "lora", "--lr", "3e-3", "--max-steps", "8")
    capsys.readouterr()
    ours, _ = load(out, dtype="fp32")
    theirs = PeftModel.from_pretrained(hf_model_from_dir(tiny_model_dir), str(out / "best")).eval()
    diff, moved = peft_agreement(ours, theirs, hf_model_from_dir(tiny_model_dir))
    assert diff < 1e-4 and moved > 1e-3   # the adapter changed the model, and PEFT agrees on how


def test_prefix_generation_with_cache_matches_full_forward(tiny_model_dir, tiny_bpe):
    from llamaforge.model.adapters import add_prefix
    model, _ = load(tiny_model_dir, dtype="fp32")
    add_prefix(model, 5, [10, 11, 12])
    with torch.no_grad():
        for layer in model.layers:   # a prefix that is not the model's own activations
            layer.self_attn.prefix.add_(torch.randn_like(layer.self_attn.prefix))
        ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(0))
        full = model(ids)
        model.setup_cache(1, 32)
        first = model(ids[:, :8], cache_pos=0)
        rest = torch.cat([model(ids[:, t:t + 1], cache_pos=t) for t in range(8, 12)], dim=1)
    assert (torch.cat([first, rest], 1) - full).abs().max() < 1e-5


def test_resume_is_refused_without_a_run_and_a_new_run_needs_an_empty_dir(tiny_model_dir, chat_data, tmp_path):
    with pytest.raises(SystemExit):
        main(["finetune", "sft", "--out", str(tmp_path / "nothing"), "--resume"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(SystemExit):
        run_sft(tmp_path / "full", tiny_model_dir, *chat_data)
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_a_lora_run_on_the_q4_1_default_is_not_quantised_again(tmp_path):
    """`--quantize auto` keeps a Q4_1 file's own precision as int4; merged LoRA weights are no
    longer that file's blocks, and quantising them would round the fine-tuning away."""
    from llamaforge.formats.load import load_checkpoint
    from llamaforge.model.adapters import LoRAConfig, add_lora, save_peft_adapter
    from llamaforge.model.quantize import Int4Linear, Int8Linear
    model, _ = load("default", dtype="bf16")
    add_lora(model, LoRAConfig(rank=2, targets=["q_proj"]))
    save_peft_adapter(model, tmp_path, LoRAConfig(rank=2, targets=["q_proj"]), "CAUSAL_LM", base_model="default",
                      hf_prefix="model.")
    assert load_checkpoint("default").metadata["linear_weight_type"] == "Q4_1"
    assert "linear_weight_type" not in load_checkpoint(tmp_path).metadata
    tuned, _ = load(tmp_path, dtype="bf16", quantize="auto")
    assert not any(isinstance(m, (Int4Linear, Int8Linear)) for m in tuned.modules())
    default, _ = load("default", dtype="bf16", quantize="auto")   # while the plain default is
    assert any(isinstance(m, Int4Linear) for m in default.modules())


def test_finetune_on_a_task_file(tiny_model_dir, tmp_path, capsys):
    """`--task qa` turns SQuAD questions into the prompts `evaluate --task qa` asks."""
    from llamaforge.evaluate.tasks import qa_prompt, read_task, training_examples
    squad = {"data": [{"paragraphs": [{"context": f"Llama {i} lives in Cusco.", "qas": [
        {"id": str(i), "question": "Where does it live?", "answers": [{"text": "Cusco"}]}]} for i in range(12)]}]}
    (tmp_path / "qa.json").write_text(json.dumps(squad))
    examples = training_examples(read_task(tmp_path / "qa.json", "qa"))
    assert examples[0].messages == [{"role": "user", "content": qa_prompt("Llama 0 lives in Cusco.", "Where does it live?")},
                                    {"role": "assistant", "content": "Cusco"}]
    main(["finetune", "sft", "--task", "qa", "--train", str(tmp_path / "qa.json"), "--out", str(tmp_path / "run"),
          "--model", str(tiny_model_dir), "--max-steps", "2", "--dtype", "fp32", "--samples", "0"])
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    assert "task: qa" in (tmp_path / "run" / "config.yaml").read_text()

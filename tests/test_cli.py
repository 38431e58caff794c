"""The command line: stdout carries only results, errors are one line, flags per the contract."""
import json
import subprocess
import sys

import pytest
import torch

from llamaforge.formats import gguf as gguf_format

from conftest import random_model


def run(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "llamaforge", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def tiny_gguf(tiny_bpe, tmp_path_factory):
    ckpt, _ = random_model("tiny", tiny_bpe)
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    gguf_format.save(ckpt, path, qtype="Q8_0")
    return path


def test_generate_prints_only_the_text(tiny_gguf, tiny_bpe):
    import llamaforge
    r = run("generate", "--model", str(tiny_gguf), "--temperature", "0", "--max-new-tokens", "12",
            "--ignore-eos", "--dtype", "fp32", "the llama")
    model, tok = llamaforge.load(tiny_gguf, dtype="fp32")
    expected = llamaforge.generate(model, tok, "the llama", temperature=0, max_new_tokens=12, ignore_eos=True)
    assert r.stdout == expected + "\n"


def test_the_command_line_starts_without_torch_or_training_code():
    """`--help`, `openness` and the like build their parser from light modules only."""
    code = ("import sys; from llamaforge.cli import build_parser; build_parser(training_flags=False)\n"
            "heavy = [m for m in ('torch', 'numpy', 'llamaforge.train.runconfig', 'llamaforge.formats.load') "
            "if m in sys.modules]\nassert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_generate_default_model_chat(default_checkpoint):
    """The CLI default (bf16, int4) answers as the fp32 model does, on a question whose answer no
    near-tie decides: each of its tokens leads the fp32 model's next best by 0.5 or more, where
    bf16 moves logits by ~0.1. (For "What is the capital of France?" the first token is 'The'
    by 0.08 over 'L': Intel AMX and AMD AVX-512 CPUs answer it differently.)"""
    from llamaforge.formats.load import build_model
    from llamaforge.model.generation import encode_prompt
    question = "What is the capital of Japan?"
    ids = torch.tensor([encode_prompt(default_checkpoint.tokenizer, question, chat=True)])
    fp32 = build_model(default_checkpoint, "fp32")
    answer = []
    with torch.no_grad():
        for _ in range(10):   # "The capital of Japan is Tokyo": 6 tokens
            top = fp32(ids, last_only=True)[0, -1].topk(2)
            assert top.values[0] - top.values[1] >= 0.5, (answer, top)
            answer.append(int(top.indices[0]))
            ids = torch.cat([ids, top.indices[:1][None]], dim=1)
            if "Tokyo" in default_checkpoint.tokenizer.decode(answer):
                break
    assert "Tokyo" in default_checkpoint.tokenizer.decode(answer)
    r = run("generate", "--chat", "--temperature", "0", "--max-new-tokens", "20", question)
    assert "Tokyo" in r.stdout
    assert r.stdout.count("\n") <= 3 and "<|im" not in r.stdout


def test_sampling_flags_and_seed(tiny_gguf):
    args = ["generate", "--model", str(tiny_gguf), "--temperature", "1.0", "--top-k", "50", "--top-p", "0.95",
            "--seed", "7", "--max-new-tokens", "10", "--ignore-eos", "x"]
    assert run(*args).stdout == run(*args).stdout


def test_chat_keeps_history(tiny_gguf, monkeypatch):
    import io

    from llamaforge.cli import chat
    from llamaforge.model.generation import SamplingConfig, stream
    prompts, replies = [], []

    def recording_stream(model, tok, ids, cfg, **kw):   # the real stream, with its inputs recorded
        prompts.append(tok.decode(ids))
        replies.append("")
        for piece in stream(model, tok, ids, cfg):
            replies[-1] += piece
            yield piece
    monkeypatch.setattr(chat, "stream", recording_stream)
    out = io.StringIO()
    cfg = SamplingConfig(max_new_tokens=5, temperature=0, ignore_eos=True)
    chat.chat_loop(str(tiny_gguf), cfg, dtype="fp32", system="be nice",
                   stdin=io.StringIO("hello\nand again\n/reset\nfresh\n"), stdout=out)
    assert len(prompts) == 3
    assert "be nice" in prompts[0] and "hello" in prompts[0]
    # The second turn carries the first exchange, the model's reply included, verbatim.
    assert prompts[1].startswith(prompts[0] + replies[0] + "<|im_end|>")
    assert "and again" in prompts[1] and out.getvalue() == "".join(r + "\n" for r in replies)
    assert "hello" not in prompts[2] and "be nice" in prompts[2] and "fresh" in prompts[2]


def test_info_json(tiny_gguf):
    info = json.loads(run("info", str(tiny_gguf), "--format", "json").stdout)
    assert info["architecture"] == "llama" and info["layers"] == 2 and info["kv_heads"] == 2
    assert info["chat_template"] is True and info["tokenizer"]["kind"] == "byte-level BPE"
    assert "Q8_0" in info["stored_as"]


def test_info_default_text():
    out = run("info").stdout
    assert "SmolLM2" in out or "Smollm2" in out
    assert "apache-2.0" in out and "Q4_1" in out


def test_export_hf_then_generate(tiny_gguf, tmp_path):
    run("export", str(tiny_gguf), "--to", "hf", str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").exists()
    a = run("generate", "--model", str(tmp_path / "hf"), "--temperature", "0", "--max-new-tokens", "8",
            "--ignore-eos", "--dtype", "fp32", "abc").stdout
    b = run("generate", "--model", str(tiny_gguf), "--temperature", "0", "--max-new-tokens", "8",
            "--ignore-eos", "--dtype", "fp32", "abc").stdout
    assert a == b


@pytest.mark.parametrize("model,flags,message", [
    ("/nonexistent/model.gguf", [], "no such file or directory"),
    ("README.md", [], "not a GGUF file"),
    ("default", ["--quantize", "int4", "--dtype", "fp32"], "--quantize int4 computes in bf16"),
])
def test_errors_are_one_line(model, flags, message):
    r = run("generate", "--model", model, *flags, "hi", check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_export_gguf_round_trip(tiny_gguf, tmp_path):
    from llamaforge.formats.load import load_checkpoint
    out = run("export", str(tiny_gguf), "--to", "gguf", "--quant", "Q8_0", str(tmp_path / "again.gguf")).stdout
    assert out.strip() == str(tmp_path / "again.gguf")
    a, b = load_checkpoint(tiny_gguf), load_checkpoint(tmp_path / "again.gguf")
    # Re-quantising Q8_0 values to Q8_0 finds the same blocks.
    assert all((a.state_dict[k] - b.state_dict[k]).abs().max() <= 1e-3 * a.state_dict[k].abs().max()
               for k in a.state_dict)
    assert run("export", str(tiny_gguf), "--to", "gguf", str(tmp_path / "again.gguf"), check=False).returncode == 1

"""QLoRA: LoRA over a frozen base held in int8 or int4. The quantised weights are the inference
formats', gradients reach the adapters through the dequantised weights without autograd keeping
them, runs learn and save ordinary PEFT adapters, which merge onto the dequantised base."""
import json

import pytest
import torch
import torch.nn.functional as F
from test_sft import chat_rows, write_jsonl

from llamaforge.cli import main
from llamaforge.formats.load import load
from llamaforge.model.adapters import LoRAConfig, add_lora, quantize_frozen_base
from llamaforge.model.config import LlamaConfig
from llamaforge.model.llama import Llama
from llamaforge.model.quantize import FrozenQuantizedLinear, Int4Linear, Int8Linear
from llamaforge.train.memory import estimate_training_memory

from conftest import sentiment_file


def test_the_quantised_weights_are_the_inference_formats():
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    int8 = Int8Linear(w, None, torch.bfloat16)
    assert torch.equal(FrozenQuantizedLinear(w, None, 8).dequantized(torch.float32),
                       int8.weight.float() * int8.scales.float()[:, None])
    int4 = Int4Linear(w, None, torch.float32, keep_dense=True)
    ours = FrozenQuantizedLinear(w, None, 4)
    assert ours.weight.dtype == torch.uint8 and ours.weight.shape == (96, 64)   # two values a byte
    # The same levels; only the rounding of each group's offset to bf16 differs.
    step = (w.view(96, 4, 32).amax(-1) - w.view(96, 4, 32).amin(-1)) / 15
    diff = (ours.dequantized(torch.float32) - int4.dense_t.t()).view(96, 4, 32).abs().amax(-1)
    assert (diff <= 0.02 * step + 0.01 * w.abs().max()).all()
    assert (ours.dequantized(torch.float32) - w).abs().max() <= step.max() * 0.51 + 0.02


@pytest.mark.parametrize("bits", [4, 8])
def test_gradients_reach_the_input_and_no_weight_is_kept(bits):
    torch.manual_seed(0)
    layer = FrozenQuantizedLinear(torch.randn(256, 512), torch.randn(256), bits)
    x = torch.randn(3, 7, 512, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        y = layer(x)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, layer.dequantized(torch.float32), layer.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-3)
    assert all(b.grad is None for b in layer.buffers())
    assert sum(saved) < 256 * 512 * 2 / 4   # autograd keeps no dequantised weight


def test_only_the_frozen_linears_are_quantised():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny"))
    add_lora(model, LoRAConfig(rank=4, targets=["q_proj", "v_proj"]))
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    quantize_frozen_base(model, "int4")
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn.q_proj.quantized is not None and not hasattr(attn.q_proj, "weight")
    assert isinstance(attn.k_proj, FrozenQuantizedLinear) and isinstance(mlp.down_proj, FrozenQuantizedLinear)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable.keys() == before.keys() and all(torch.equal(trainable[n], before[n]) for n in before)
    assert model.embed_tokens.weight.dtype == torch.float32   # embeddings and norms untouched


def test_the_estimate_counts_the_quantised_base():
    def estimate(kind):
        with torch.device("meta"):
            model = Llama(LlamaConfig.from_name("smollm2-135m")).to(torch.bfloat16)
        add_lora(model, LoRAConfig(rank=8))
        if kind:
            quantize_frozen_base(model, kind)
        return estimate_training_memory(model, micro_batch_size=8, seq_len=128).weights
    c = LlamaConfig.from_name("smollm2-135m")
    kv = c.n_kv_heads * c.head_dim
    n_block = c.n_layers * (c.dim * (2 * c.dim + 2 * kv) + 3 * c.dim * c.intermediate_size)   # the linears' weights
    bf16, int8, int4 = estimate(None), estimate("int8"), estimate("int4")
    # bf16: 2 bytes a weight; int8: 1 and a bf16 scale a row; int4: half a byte and two bf16 a group of 32
    assert bf16 - int8 == pytest.approx(n_block * 1, rel=0.01)
    assert bf16 - int4 == pytest.approx(n_block * (2 - 0.5 - 4 / 32), rel=0.01)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    return write_jsonl(d / "train.jsonl", chat_rows(96)), write_jsonl(d / "dev.jsonl", chat_rows(16, seed=1))


def test_qlora_sft_learns_and_its_adapter_merges_onto_the_dequantised_base(tiny_model_dir, chat_data, tmp_path, capsys):
    from peft import PeftModel

    from llamaforge.train.sft import SFTConfig, build_model

    from conftest import hf_model_from_dir
    out = tmp_path / "qlora"
    main(["finetune", "sft", "--train", str(chat_data[0]), "--dev", str(chat_data[1]), "--out", str(out),
          "--model", str(tiny_model_dir), "--dtype", "fp32", "--batch-size", "8", "--seed", "0", "--method", "lora",
          "--quantize-base", "int4", "--lr", "1e-2", "--epochs", "3", "--eval-every", "4"])
    captured = capsys.readouterr()
    assert "peak memory while training" in captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [e["loss"] for e in metrics["evals"]]
    assert losses[-1] < losses[0] - 0.1, losses
    assert metrics["peak_memory_mb"] > 0
    assert json.loads((out / "best" / "quantized_base.json").read_text())["quantize_base"] == "int4"
    # The run as a model: the adapter folded onto the dequantised base computes what the
    # training model (adapter over the int4 base) computes.
    merged, _ = load(out, dtype="fp32")
    trained, _ = build_model(SFTConfig(model=str(tiny_model_dir), dtype="fp32", quantize_base="int4"))
    from llamaforge.model.adapters import load_peft_adapter
    load_peft_adapter(trained, out / "best", hf_prefix="model.")
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(ids) - trained(ids)).abs().max() < 1e-4
        # ... and it is an ordinary PEFT adapter, for the full-precision base too.
        peft = PeftModel.from_pretrained(hf_model_from_dir(tiny_model_dir), str(out / "best")).eval()
        full = hf_model_from_dir(tiny_model_dir)
        tuned, base, ours = peft(input_ids=ids).logits, full(input_ids=ids).logits, merged(ids)
    # On the full-precision base it computes what ours does but for the int4 rounding of a tiny
    # random model, far nearer to it than the base without the adapter.
    assert (tuned - ours).abs().mean() < 0.5 * (base - ours).abs().mean()


def test_qlora_classification_with_an_int8_base(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "clf"
    main(["finetune", "classify", "--model", str(tiny_model_dir), "--train", str(sentiment_file("train")),
          "--dev", str(sentiment_file("dev")), "--out", str(out), "--batch-size", "16", "--dtype", "bf16",
          "--quantize-base", "int8", "--max-steps", "6", "--lora-rank", "4"])
    capsys.readouterr()
    main(["evaluate", str(out), "--data", str(sentiment_file("dev")), "--format", "json"])
    scores = json.loads(capsys.readouterr().out)
    best = json.loads((out / "metrics.json").read_text())["evals"][-1]
    # evaluate rebuilds the run's int8 base: it scores what training scored.
    assert scores["accuracy"] == pytest.approx(best["accuracy"])


def test_quantize_base_needs_lora(tiny_model_dir, chat_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "sft", "--train", str(chat_data[0]), "--out", str(tmp_path / "x"), "--model",
              str(tiny_model_dir), "--method", "full", "--quantize-base", "int4"])
    assert "--quantize-base" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["finetune", "sft", "--train", str(chat_data[0]), "--out", str(tmp_path / "y"), "--model",
              str(tiny_model_dir), "--quantize-base", "nf4"])
    assert "int8 or int4" in capsys.readouterr().err

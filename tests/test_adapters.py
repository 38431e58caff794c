"""LoRA: starts as the base model, merges exactly, and speaks PEFT's format both ways (PEFT
loads our adapters onto transformers' LlamaForSequenceClassification to the same logits, and we
load PEFT's)."""
import pytest
import torch

from llamaforge.errors import LlamaforgeError
from llamaforge.formats.load import load
from llamaforge.model.adapters import LoRAConfig, LoRALinear, add_lora, load_peft_adapter, merge_lora, save_peft_adapter
from llamaforge.model.llama import LlamaForClassification

from conftest import randomize_parameters

TEXTS = ["the llama model runs fast", "我 爱 羊驼", "x", "def f(x): return x ** 2 and more text here"]


def batch(tok):
    from llamaforge.data.batching import pad_right
    return pad_right([tok.encode(t) for t in TEXTS], tok.pad_id)


def randomize_lora(model, seed=0):
    randomize_parameters(model, 0.05, ("lora_B", "score.weight"), seed)


def test_lora_starts_as_base_and_merges_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48)
    lora = LoRALinear(base, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    x = torch.randn(5, 32)
    assert torch.equal(lora(x), base(x))
    with torch.no_grad():
        lora.lora_B.normal_()
    assert not torch.allclose(lora(x), base(x))
    torch.testing.assert_close(lora.merged()(x), lora(x), atol=1e-5, rtol=1e-5)


def test_only_lora_and_head_train(tiny_model_dir):
    llama, _ = load(tiny_model_dir)
    add_lora(llama, LoRAConfig(rank=4, targets=["q_proj", "v_proj"]))
    clf = LlamaForClassification(llama, 3)
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) or n == "score.weight" for n in trainable)
    assert {n.split(".")[-2] for n in trainable if "lora" in n} == {"q_proj", "v_proj"}


def test_unknown_target_is_an_error():
    with pytest.raises(LlamaforgeError, match="unknown LoRA target 'qkv'"):
        LoRAConfig(targets=["qkv"])


def _hf_classifier(tiny_model_dir, tok, num_labels):
    from transformers import LlamaForSequenceClassification
    return LlamaForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=num_labels,
                                                          pad_token_id=tok.pad_id, dtype=torch.float32).eval()


def test_peft_loads_our_adapter_to_the_same_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    llama, tok = load(tiny_model_dir)
    cfg = LoRAConfig(rank=4, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    add_lora(llama, cfg)
    clf = LlamaForClassification(llama, 3).eval()
    randomize_lora(clf)
    save_peft_adapter(clf, tmp_path, cfg, "SEQ_CLS", modules_to_save=["score"], base_model=str(tiny_model_dir))
    ids, lengths = batch(tok)
    with torch.no_grad():
        ours = clf(ids, lengths)
        theirs = PeftModel.from_pretrained(_hf_classifier(tiny_model_dir, tok, 3), str(tmp_path)).eval()(ids).logits
    assert (ours - theirs).abs().max() < 1e-4
    # Merged in fp32, the same logits again.
    merge_lora(llama)
    with torch.no_grad():
        assert (clf(ids, lengths) - theirs).abs().max() < 1e-4


def test_we_load_a_peft_adapter_to_the_same_logits(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from llamaforge.model.adapters import read_peft_config
    _, tok = load(tiny_model_dir)
    torch.manual_seed(1)
    hf = get_peft_model(_hf_classifier(tiny_model_dir, tok, 2),
                        LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=4, target_modules=["gate_proj", "up_proj", "q_proj"]))
    randomize_lora(hf)
    hf.save_pretrained(str(tmp_path))
    llama, _ = load(tiny_model_dir)
    add_lora(llama, read_peft_config(tmp_path))
    clf = LlamaForClassification(llama, 2).eval()
    load_peft_adapter(clf, tmp_path)
    ids, lengths = batch(tok)
    with torch.no_grad():
        assert (clf(ids, lengths) - hf.eval()(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("change, message", [
    ({"r": None}, r"adapter_config\.json: needs r \(a positive integer\)"),
    ({"lora_alpha": "big"}, r"adapter_config\.json: needs r .*lora_alpha='big'"),
    ({"target_modules": [1, 2]}, r"adapter_config\.json: target_modules must be a list of module names"),
])
def test_a_damaged_adapter_config_is_named(tmp_path, change, message):
    import json

    from llamaforge.errors import LlamaforgeError
    from llamaforge.model.adapters import read_peft_config
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg | change))
    with pytest.raises(LlamaforgeError, match=message):
        read_peft_config(tmp_path)


@pytest.mark.parametrize("bias, dropout, x_grad", [(True, 0.0, True), (False, 0.0, False), (True, 0.1, True)])
def test_lora_trains_with_its_own_backward_and_infers_in_place_to_the_same_numbers(bias, dropout, x_grad):
    """Training's product (_LoRAProduct, its own backward; with dropout autograd's out-of-place
    form) and inference's in-place one give the same output, and the gradients of the plain
    formula x W^T + b + (drop(x) A^T B^T) * alpha / rank, whether x needs one or not."""
    torch.manual_seed(0)
    lora = LoRALinear(torch.nn.Linear(32, 48, bias=bias), LoRAConfig(rank=4, alpha=8, dropout=dropout))
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(2, 5, 32, requires_grad=x_grad)
    torch.manual_seed(1)
    y = lora(x)
    if not dropout:
        with torch.no_grad():
            assert torch.equal(lora(x), y)   # the in-place path, nothing needing a gradient
    dy = torch.randn_like(y)
    y.backward(dy)
    x2, A, B = (t.detach().clone().requires_grad_() for t in (x, lora.lora_A, lora.lora_B))
    torch.manual_seed(1)
    dropped = lora.dropout(x2)   # the same mask
    (torch.nn.functional.linear(x2, lora.weight, lora.bias) + (dropped @ A.t() @ B.t()) * 2.0).backward(dy)
    pairs = [(lora.lora_A.grad, A.grad), (lora.lora_B.grad, B.grad)] + ([(x.grad, x2.grad)] if x_grad else [])
    assert x_grad or x.grad is None
    for ours, ref in pairs:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

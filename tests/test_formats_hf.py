"""HF directories in and out, checked against transformers itself."""
import json

import pytest
import torch

from llamaforge.errors import LlamaforgeError
from llamaforge.formats import hf as hf_format
from llamaforge.formats.load import build_model, load_checkpoint

from conftest import MIXED_TEXT, hf_model_from_dir, random_model


def save_with_transformers(hf_model, tokenizer_json, out, **kwargs):
    """An HF directory as transformers itself writes one, tokenizer and chat template included."""
    from transformers import PreTrainedTokenizerFast

    from llamaforge.text.chat_template import DEFAULT_CHAT_TEMPLATE
    hf_model.save_pretrained(out, **kwargs)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def ids_for(n=40, seed=0):
    return torch.randint(0, 512, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kwargs", [{}, {"max_shard_size": "100KB"}, {"safe_serialization": False}],
                         ids=["safetensors", "sharded", "pytorch_bin"])
def test_reads_transformers_directories(kwargs, tiny_bpe, bpe_tokenizer_json, tmp_path):
    ckpt, twin = random_model("tiny-llama3", tiny_bpe)
    bin_weights = kwargs.pop("safe_serialization", True) is False
    ref_tok = save_with_transformers(twin, bpe_tokenizer_json, tmp_path, **kwargs)
    if bin_weights:
        # transformers 5 always writes safetensors: write the .bin as older releases did, a
        # torch.save'd state dict, and leave it the only weights in the directory.
        for f in tmp_path.glob("*.safetensors"):
            f.unlink()
        torch.save(twin.state_dict(), tmp_path / "pytorch_model.bin")
        assert not list(tmp_path.glob("*.safetensors")) and (tmp_path / "pytorch_model.bin").exists()
    if kwargs.get("max_shard_size"):
        assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == ckpt.config
    ids = ids_for()
    with torch.no_grad():
        assert (build_model(loaded)(ids) - twin(ids).logits).abs().max() < 1e-4
    for text in MIXED_TEXT:
        assert loaded.tokenizer.encode(text) == ref_tok.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert loaded.tokenizer.apply_chat_template(msgs) == ref_tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha", "tiny-llama3"])
def test_export_loads_in_transformers(preset, tiny_bpe, tmp_path):
    from transformers import AutoTokenizer
    ckpt, twin = random_model(preset, tiny_bpe)
    hf_format.save(ckpt, tmp_path / "out")
    ref = hf_model_from_dir(tmp_path / "out")
    ids = ids_for(seed=1)
    with torch.no_grad():
        assert (ref(ids).logits - twin(ids).logits).abs().max() < 1e-4
    ref_tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for text in MIXED_TEXT:
        assert ref_tok.encode(text) == tiny_bpe.encode(text)
    assert ref_tok.chat_template == tiny_bpe.chat_template
    # ... and it reads back into llamaforge unchanged.
    again = load_checkpoint(tmp_path / "out")
    assert again.config == ckpt.config
    assert all(torch.equal(again.state_dict[k], v) for k, v in ckpt.state_dict.items())


def test_export_never_leaves_a_half_written_directory(tiny_bpe, tmp_path, monkeypatch):
    ckpt, _ = random_model("tiny", tiny_bpe)

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(type(ckpt.tokenizer), "save_hf", fail)
    with pytest.raises(OSError):
        hf_format.save(ckpt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_empty_directory(tiny_bpe, tmp_path):
    ckpt, _ = random_model("tiny", tiny_bpe)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(LlamaforgeError, match="not empty"):
        hf_format.save(ckpt, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# --- bad directories ----------------------------------------------------------------------

@pytest.fixture
def exported(tiny_bpe, tmp_path):
    ckpt, _ = random_model("tiny", tiny_bpe)
    hf_format.save(ckpt, tmp_path / "m")
    return tmp_path / "m"


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def expect_error(path, pattern):
    with pytest.raises(LlamaforgeError, match=pattern) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_missing_config_field(exported):
    edit_config(exported, hidden_size=None)
    expect_error(exported, r"config.json: missing field hidden_size")


def test_unsupported_architecture(exported):
    edit_config(exported, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    expect_error(exported, "unsupported architecture")


def test_config_not_json(exported):
    (exported / "config.json").write_text("{not json")
    expect_error(exported, "config.json: not valid JSON")


@pytest.mark.parametrize("name, content, message", [
    ("config.json", "[1, 2]", r"config\.json: expected a JSON object, found list"),
    ("tokenizer_config.json", '{"chat_template": 5}', r"tokenizer_config\.json: chat_template must be"),
    ("tokenizer_config.json", '{"eos_token": [1]}', r"tokenizer_config\.json: eos_token: expected a token"),
    ("generation_config.json", '{"eos_token_id": "x"}', r"generation_config\.json: eos_token_id must be"),
])
def test_damaged_json_files_are_named(exported, name, content, message):
    """JSON of the wrong shape is a one-line error naming the file, not a traceback."""
    (exported / name).write_text(content)
    expect_error(exported, message)


def test_wrong_shape(exported):
    edit_config(exported, intermediate_size=128)
    expect_error(exported, r"mlp\.(gate|up|down)_proj\.weight has shape \((160, 64|64, 160)\), expected \((128, 64|64, 128)\)")


def test_missing_tensor(exported):
    from safetensors.torch import load_file, save_file
    state = load_file(str(exported / "model.safetensors"))
    del state["model.layers.1.self_attn.v_proj.weight"]
    save_file(state, str(exported / "model.safetensors"))
    expect_error(exported, "missing tensor layers.1.self_attn.v_proj.weight")


def test_truncated_safetensors(exported):
    data = (exported / "model.safetensors").read_bytes()
    (exported / "model.safetensors").write_bytes(data[:len(data) // 2])
    expect_error(exported, "model.safetensors: unreadable safetensors file")


def test_missing_weights(exported):
    (exported / "model.safetensors").unlink()
    expect_error(exported, "no \\*.safetensors or pytorch_model.bin weights")


def test_pickle_with_code_is_refused(exported):
    # weights_only=True: a .bin that would run code on unpickling is rejected, never executed.
    import pickle
    (exported / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(exported / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    expect_error(exported, "pytorch_model.bin: unreadable PyTorch weights")


def test_sentencepiece_only_hf_directory(spm_model, tmp_path):
    """Older Llama 2 style directories carry tokenizer.model and no tokenizer.json."""
    import shutil

    import sentencepiece as spm

    from llamaforge.text.convert import from_sentencepiece_model
    tok = from_sentencepiece_model(spm_model)
    ckpt, twin = random_model("tiny-mha", tok, vocab_size=tok.vocab_size)
    hf_format.save(ckpt, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    shutil.copy(spm_model, tmp_path / "m" / "tokenizer.model")
    loaded = load_checkpoint(tmp_path / "m")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    for text in MIXED_TEXT:
        assert loaded.tokenizer.encode(text) == [sp.bos_id()] + sp.encode(text)

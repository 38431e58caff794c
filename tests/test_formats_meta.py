"""Meta's original layout: written by the test from a tiny model, checked against its HF twin and
against an independent forward pass written the way Meta's reference code computes RoPE."""
import json

import pytest
import torch

from llamaforge.errors import LlamaforgeError
from llamaforge.formats import meta as meta_format
from llamaforge.formats.load import build_model, load_checkpoint
from llamaforge.text.convert import from_sentencepiece_model

from conftest import MIXED_TEXT, random_model


@pytest.fixture
def meta_dir(spm_model, tmp_path):
    tok = from_sentencepiece_model(spm_model)
    # Meta's params.json names only the factor; the rest of Llama-3 scaling is Meta's constants.
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    ckpt, twin = random_model("tiny-llama3", tok, vocab_size=tok.vocab_size, rope_scaling=scaling)
    meta_format.save(ckpt, tmp_path / "meta", tokenizer_model=spm_model)
    return tmp_path / "meta", ckpt, twin


def meta_reference_logits(path, ids):
    """Meta's formulation, independent of our loader: complex rotation of adjacent pairs
    (x[2i], x[2i+1]) with the weights exactly as consolidated.00.pth stores them."""
    params = json.loads((path / "params.json").read_text())
    sd = torch.load(path / "consolidated.00.pth", weights_only=True)
    dim, H, Hkv = params["dim"], params["n_heads"], params["n_kv_heads"]
    hd, T = dim // H, ids.shape[1]
    from llamaforge.model.config import LlamaConfig
    from llamaforge.model.llama import rope_inv_freq
    inv = rope_inv_freq(LlamaConfig(dim=dim, n_heads=H, rope_theta=params["rope_theta"],
                                    rope_scaling=dict(factor=params["rope_scaling_factor"], low_freq_factor=1.0,
                                                      high_freq_factor=4.0, original_max_position_embeddings=8192)
                                    if params.get("use_scaled_rope") else None))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), inv))

    def rope(x):  # (B, T, h, hd)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None]).flatten(3)

    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + params["norm_eps"]))

    x = sd["tok_embeddings.weight"][ids]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        h = norm(x, sd[p + "attention_norm.weight"])
        q = rope((h @ sd[p + "attention.wq.weight"].T).view(1, T, H, hd))
        k = rope((h @ sd[p + "attention.wk.weight"].T).view(1, T, Hkv, hd))
        v = (h @ sd[p + "attention.wv.weight"].T).view(1, T, Hkv, hd)
        k, v = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
        att = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3)) / hd ** 0.5 + mask
        o = (att.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(1, T, dim)
        x = x + o @ sd[p + "attention.wo.weight"].T
        h = norm(x, sd[p + "ffn_norm.weight"])
        f = torch.nn.functional.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)
        x = x + f @ sd[p + "feed_forward.w2.weight"].T
    return norm(x, sd["norm.weight"]) @ sd["output.weight"].T


def test_meta_dir_loads_like_its_hf_twin(meta_dir):
    path, ckpt, twin = meta_dir
    loaded = load_checkpoint(path)
    ids = torch.randint(0, 400, (1, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = build_model(loaded)(ids)
        assert (ours - twin(ids).logits).abs().max() < 1e-4
    for text in MIXED_TEXT:
        assert loaded.tokenizer.encode(text) == ckpt.tokenizer.encode(text)


def test_meta_layout_is_metas_own(meta_dir):
    path, ckpt, twin = meta_dir
    ids = torch.randint(0, 400, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (meta_reference_logits(path, ids) - twin(ids).logits).abs().max() < 1e-4


def test_model_parallel_shards(meta_dir):
    path, ckpt, twin = meta_dir
    sd = torch.load(path / "consolidated.00.pth", weights_only=True)
    shards = [{}, {}]
    for name, t in sd.items():
        dim = 1 if name.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else \
            None if "norm" in name else 0
        for i, part in enumerate([t, t] if dim is None else t.chunk(2, dim=dim)):
            shards[i][name] = part.clone()
    (path / "consolidated.00.pth").unlink()
    for i, s in enumerate(shards):
        torch.save(s, path / f"consolidated.{i:02d}.pth")
    loaded = load_checkpoint(path)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in ckpt.state_dict.items() if k != "lm_head.weight")


def test_missing_tokenizer(meta_dir):
    path = meta_dir[0]
    (path / "tokenizer.model").unlink()
    with pytest.raises(LlamaforgeError, match="no tokenizer.model"):
        load_checkpoint(path)


def test_missing_params_field(meta_dir):
    path = meta_dir[0]
    params = json.loads((path / "params.json").read_text())
    del params["n_heads"]
    (path / "params.json").write_text(json.dumps(params))
    with pytest.raises(LlamaforgeError, match="params.json: missing field n_heads"):
        load_checkpoint(path)


def test_corrupt_weights(meta_dir):
    path = meta_dir[0]
    (path / "consolidated.00.pth").write_bytes(b"\x80\x04garbage")
    with pytest.raises(LlamaforgeError, match="consolidated.00.pth: unreadable PyTorch weights"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def tiktoken_ranks():
    """tiktoken ranks trained here with Llama 3's pattern (tiktoken's own trainer), as Meta's
    Llama 3 `tokenizer.model` holds them for 128k tokens."""
    from tiktoken._educational import bpe_train

    from llamaforge.text.pretokenizers import LLAMA3_SPLIT

    from conftest import corpus_lines
    return bpe_train("\n".join(corpus_lines(300, seed=4)), vocab_size=420, pat_str=LLAMA3_SPLIT, visualise=None)


def write_tiktoken(path, ranks):
    import base64
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1])))
    return path


def test_llama3_tiktoken_vocabulary_tokenizes_as_tiktoken(tiktoken_ranks, tmp_path):
    import tiktoken

    from llamaforge.text.convert import from_tiktoken_model, llama3_special_tokens
    from llamaforge.text.pretokenizers import LLAMA3_SPLIT
    ours = from_tiktoken_model(write_tiktoken(tmp_path / "tokenizer.model", tiktoken_ranks))
    n = len(tiktoken_ranks)
    specials = {name: n + i for i, name in enumerate(llama3_special_tokens(256, llama31=True))}
    ref = tiktoken.Encoding("llama3-kind", pat_str=LLAMA3_SPLIT, mergeable_ranks=tiktoken_ranks, special_tokens=specials)
    texts = MIXED_TEXT + ["it's THEY'RE 1234567 x=42;\n\n\t  done", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]
    for text in texts:
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, allowed_special="all"), text
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    assert ours.encode("hi")[0] == specials["<|begin_of_text|>"] == ours.bos_id
    assert ours.stop_ids == {specials["<|end_of_text|>"], specials["<|eot_id|>"], specials["<|eom_id|>"]}


def test_llama3_meta_dir_loads_and_exports(tiktoken_ranks, tmp_path):
    """A Llama 3.1-style Meta directory (tiktoken vocabulary, scaled RoPE, no max_seq_len): its
    tokenizer, Llama 3's chat format, the 128k context of its family, all carried to HF."""
    from llamaforge.formats import hf as hf_format
    from llamaforge.text.convert import from_tiktoken_model
    model_file = write_tiktoken(tmp_path / "tokenizer.model", tiktoken_ranks)
    tok = from_tiktoken_model(model_file)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    ckpt, twin = random_model("tiny-llama3", tok, vocab_size=tok.vocab_size, rope_scaling=scaling)
    meta_format.save(ckpt, tmp_path / "meta", tokenizer_model=model_file)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    del params["max_seq_len"]
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    loaded = load_checkpoint(tmp_path / "meta")
    assert loaded.config.max_seq_len == 131072
    chat = loaded.tokenizer.apply_chat_template([{"role": "user", "content": " hi "}])
    assert chat == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ids = torch.randint(0, tok.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (build_model(loaded)(ids) - twin(ids).logits).abs().max() < 1e-4
    hf_format.save(loaded, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"] == 131072
    again = load_checkpoint(tmp_path / "hf").tokenizer
    for text in MIXED_TEXT:
        assert again.encode(text) == loaded.tokenizer.encode(text)


@pytest.mark.parametrize("params, context", [
    ({"norm_eps": 1e-05}, 4096),                        # Llama 2: params.json has no max_seq_len
    ({"norm_eps": 1e-06}, 2048),                        # LLaMA 1
    ({"norm_eps": 1e-05, "rope_theta": 1000000.0}, 16384),   # Code Llama
    ({"norm_eps": 1e-05, "rope_theta": 500000.0}, 8192),     # Llama 3
])
def test_a_missing_context_is_the_familys(meta_dir, params, context):
    path = meta_dir[0]
    saved = json.loads((path / "params.json").read_text())
    for key in ("max_seq_len", "use_scaled_rope", "rope_scaling_factor", "rope_theta"):
        saved.pop(key, None)
    (path / "params.json").write_text(json.dumps(saved | params))
    assert load_checkpoint(path).config.max_seq_len == context


def test_a_broken_tiktoken_vocabulary_names_its_line(meta_dir):
    path = meta_dir[0]
    (path / "tokenizer.model").write_text("IQ== 0\nIg== 1\nnot-base64! 2\n")
    with pytest.raises(LlamaforgeError, match=r"tokenizer\.model:3: not base64"):
        load_checkpoint(path)

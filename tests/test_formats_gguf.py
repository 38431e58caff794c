"""GGUF in and out: every quant type the gguf package writes, both tokenizer kinds, bad files."""
import struct

import numpy as np
import pytest
import torch

from llamaforge.errors import LlamaforgeError
from llamaforge.formats import gguf as gguf_format
from llamaforge.formats.gguf_header import read_gguf
from llamaforge.formats.load import build_model, load_checkpoint
from llamaforge.text.convert import from_sentencepiece_model

from conftest import MIXED_TEXT, random_model

QUANT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4"]
# Types the gguf package writes only for rows of 256 values.
WIDE_QUANT_TYPES = ["TQ1_0", "TQ2_0"]
# Types it reads but cannot write: llama.cpp's K-quants and i-quants.
READ_ONLY_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ3_S", "IQ1_S"]


# The largest logit difference a type may make, relative to the largest logit: about twice what
# the tiny model measures (F16 2e-4, BF16 1.4e-3, Q8_0 5e-3, Q4 0.075, Q5 0.04, MXFP4 0.11); F32 is exact.
LOGIT_TOLERANCE = {"F32": 0.0, "F16": 5e-4, "BF16": 3e-3, "Q8_0": 1e-2, "Q4_0": 0.15, "Q4_1": 0.15, "Q5_0": 0.08,
                   "Q5_1": 0.08, "MXFP4": 0.2}


def logits(ckpt, ids):
    with torch.no_grad():
        return build_model(ckpt, "fp32")(ids)


def expected_weight(w: torch.Tensor, qtype: str, name: str) -> torch.Tensor:
    """What a reader must get back: the gguf package's own quantise -> dequantise of the source,
    with Q/K rows in llama.cpp's layout and back (norms and odd-sized rows stay F32)."""
    import gguf
    qt = gguf.GGMLQuantizationType[qtype]
    arr = w.float().numpy()
    if arr.ndim != 2 or arr.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0] or qt == gguf.GGMLQuantizationType.F32:
        return w.float()
    return torch.from_numpy(np.array(gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt))).float()


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_quant_types_load_like_their_source(qtype, tiny_bpe, tmp_path):
    ckpt, _ = random_model("tiny", tiny_bpe)
    path = tmp_path / f"tiny-{qtype}.gguf"
    gguf_format.save(ckpt, path, qtype=qtype)
    loaded = load_checkpoint(path)
    assert loaded.config == ckpt.config
    for name, w in ckpt.state_dict.items():
        # Q/K permutation commutes with row-wise block quantisation (rows move whole).
        assert torch.equal(loaded.state_dict[name].float(), expected_weight(w, qtype, name)), name
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    source = logits(ckpt, ids)
    diff = ((logits(loaded, ids) - source).abs().max() / source.abs().max()).item()
    assert diff <= LOGIT_TOLERANCE[qtype], (qtype, diff)
    for text in MIXED_TEXT:
        assert loaded.tokenizer.encode(text) == tiny_bpe.encode(text)
    assert loaded.tokenizer.chat_template == tiny_bpe.chat_template


@pytest.mark.parametrize("qtype", WIDE_QUANT_TYPES)
def test_wide_block_quant_types(qtype, tiny_bpe, tmp_path):
    ckpt, _ = random_model("tiny", tiny_bpe, dim=256, intermediate_size=512)
    gguf_format.save(ckpt, tmp_path / "w.gguf", qtype=qtype)
    loaded = load_checkpoint(tmp_path / "w.gguf")
    for name, w in ckpt.state_dict.items():
        assert torch.equal(loaded.state_dict[name].float(), expected_weight(w, qtype, name)), name


def test_read_only_quant_types_dequantise_like_the_gguf_package(tmp_path):
    """Random blocks of each K-/i-quant type, read through our reader: the same values as the
    gguf package's own dequantiser gives for those bytes."""
    import gguf
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    raw = {}
    for name in READ_ONLY_TYPES:
        qt = gguf.GGMLQuantizationType[name]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        data = rng.integers(0, 256, (4, 512 // block * size), dtype=np.uint8)
        # Keep the f16 scales finite: random bytes can spell NaN.
        data.view(np.uint8)[:] = np.where(data >= 0x7C, data & 0x3F, data)
        raw[name] = data
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _, tensors, buf = read_gguf(tmp_path / "k.gguf")
    for name, data in raw.items():
        shape, qtype, start, nbytes = tensors[name]
        assert shape == (4, 512)
        ours = gguf_format._dequantize(buf, shape, qtype, start, nbytes, tmp_path, name)
        ref = torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype)))
        assert torch.equal(ours, ref), name


def test_transformers_reads_our_gguf_to_the_same_logits(tiny_bpe, tmp_path):
    # An independent reader: checks our Q/K permutation and metadata, not just our round trip.
    from transformers import AutoModelForCausalLM
    ckpt, hf_twin = random_model("tiny", tiny_bpe)
    gguf_format.save(ckpt, tmp_path / "m.gguf")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = ref(ids).logits
    assert (theirs - hf_twin(ids).logits).abs().max() < 1e-4
    assert (logits(load_checkpoint(tmp_path / "m.gguf"), ids) - theirs).abs().max() < 1e-4


def test_llama3_rope_scaling_round_trip(tiny_bpe, tmp_path):
    ckpt, hf_twin = random_model("tiny-llama3", tiny_bpe)
    gguf_format.save(ckpt, tmp_path / "l3.gguf")
    loaded = load_checkpoint(tmp_path / "l3.gguf")
    assert loaded.config.rope_scaling == ckpt.config.rope_scaling
    ids = torch.randint(0, 512, (1, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (logits(loaded, ids) - hf_twin(ids).logits).abs().max() < 1e-4


def test_sentencepiece_vocab_in_gguf(spm_model, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = from_sentencepiece_model(spm_model)
    ckpt, _ = random_model("tiny-mha", tok, vocab_size=sp.get_piece_size())
    gguf_format.save(ckpt, tmp_path / "spm.gguf", qtype="Q8_0")
    loaded = load_checkpoint(tmp_path / "spm.gguf").tokenizer
    assert loaded.kind == "sentencepiece" and loaded.add_bos
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in MIXED_TEXT:
        assert loaded.encode(text) == [sp.bos_id()] + sp.encode(text), text
        if not text.startswith(" "):
            # transformers' Metaspace skips SentencePiece's dummy prefix before a leading space
            # (" x" -> "▁x" instead of "▁▁x"); sentencepiece itself is the reference there.
            assert loaded.encode(text) == hf_tok.encode(text), text
        assert loaded.decode(loaded.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text))


def test_smollm2_gguf_reads_as_llama_cpp_describes(default_checkpoint):
    c = default_checkpoint.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_embeddings and "lm_head.weight" not in default_checkpoint.state_dict
    assert default_checkpoint.metadata["license"] == {"general.license": "apache-2.0"}
    assert "Q4_1" in default_checkpoint.metadata["quantization"]


# --- bad files -----------------------------------------------------------------------------

@pytest.fixture
def good_gguf(tiny_bpe, tmp_path):
    ckpt, _ = random_model("tiny", tiny_bpe)
    path = tmp_path / "good.gguf"
    gguf_format.save(ckpt, path)
    return ckpt, path


def expect_error(path, pattern):
    with pytest.raises(LlamaforgeError, match=pattern) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_empty_file(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    expect_error(tmp_path / "empty.gguf", "bad magic|empty")


def test_not_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    expect_error(tmp_path / "x.gguf", "not a GGUF file")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated(good_gguf, tmp_path, keep):
    data = good_gguf[1].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    expect_error(cut, "truncated")


def test_unknown_architecture(tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    expect_error(tmp_path / "falcon.gguf", "unsupported architecture 'falcon'")


def test_unknown_quant_type(good_gguf, tmp_path):
    data = bytearray(good_gguf[1].read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 250)     # the tensor's type field
    bad = tmp_path / "badtype.gguf"
    bad.write_bytes(bytes(data))
    expect_error(bad, "blk.0.attn_q.weight has unknown GGML type 250")


def test_missing_tensor(good_gguf, tmp_path):
    ckpt = good_gguf[0]
    state = dict(ckpt.state_dict)
    del state["layers.1.mlp.up_proj.weight"]
    from dataclasses import replace
    gguf_format.save(replace(ckpt, state_dict=state), tmp_path / "missing.gguf")
    expect_error(tmp_path / "missing.gguf", "missing tensor layers.1.mlp.up_proj.weight")


def test_wrong_shape(good_gguf, tmp_path):
    ckpt = good_gguf[0]
    state = dict(ckpt.state_dict, **{"layers.0.mlp.down_proj.weight": torch.zeros(64, 32)})
    from dataclasses import replace
    gguf_format.save(replace(ckpt, state_dict=state), tmp_path / "shape.gguf")
    expect_error(tmp_path / "shape.gguf", r"layers.0.mlp.down_proj.weight has shape \(64, 32\), expected \(64, 160\)")


def test_inconsistent_head_counts(good_gguf, tmp_path):
    data = bytearray(good_gguf[1].read_bytes())
    key = b"llama.attention.head_count"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4          # value type uint32
    struct.pack_into("<I", data, at + 4, 3)                      # 3 query heads over 2 KV heads
    bad = tmp_path / "heads.gguf"
    bad.write_bytes(bytes(data))
    expect_error(bad, "n_heads .* must be a multiple of n_kv_heads")


def test_unwritable_quant_type_is_a_clear_error(good_gguf, tmp_path):
    with pytest.raises(LlamaforgeError, match="cannot write GGUF tensors as 'Q4_K'"):
        gguf_format.save(good_gguf[0], tmp_path / "k.gguf", qtype="Q4_K")
    assert list(tmp_path.glob("k.gguf*")) == []


# --- K-quants of a real model --------------------------------------------------------------------
# The gguf package reads K-quants but cannot write them; llama.cpp's Q4_K_M files are mostly
# Q4_K with Q6_K for some tensors. These encoders follow ggml's block layouts (ggml-common.h), with
# the simplest scale choice: enough to hold a model's weights at their precision.

def encode_q6_k(x: np.ndarray) -> np.ndarray:
    """Rows of 256-value blocks -> Q6_K bytes (ql[128], qh[64], int8 scales[16], f16 d)."""
    blocks = x.reshape(-1, 256).astype(np.float32)
    sub = blocks.reshape(-1, 16, 16)
    scale = np.abs(sub).max(-1) / 31                                   # per 16 values
    d = np.maximum(scale.max(-1), 1e-12) / 127
    sc = np.clip(np.round(scale / d[:, None]), 1, 127).astype(np.int8)
    step = (d[:, None] * sc)[..., None]
    q = (np.clip(np.round(sub / step), -32, 31) + 32).astype(np.uint8).reshape(-1, 256)
    out = np.zeros((len(blocks), 210), np.uint8)
    for n in (0, 1):   # two halves of 128: ql low/high nibbles and 2-bit pieces in qh
        q1, q2, q3, q4 = (q[:, 128 * n + 32 * g:128 * n + 32 * g + 32] for g in range(4))
        out[:, 64 * n:64 * n + 32] = (q1 & 0xF) | ((q3 & 0xF) << 4)
        out[:, 64 * n + 32:64 * n + 64] = (q2 & 0xF) | ((q4 & 0xF) << 4)
        out[:, 128 + 32 * n:128 + 32 * n + 32] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return out.reshape(*x.shape[:-1], -1)


def encode_q4_k(x: np.ndarray) -> np.ndarray:
    """Rows of 256-value blocks -> Q4_K bytes (f16 d, f16 dmin, 6-bit scales/mins in 12 bytes,
    4-bit q[128]): value = d * scale_j * q - dmin * min_j for each of the 8 sub-blocks of 32."""
    blocks = x.reshape(-1, 256).astype(np.float32)
    sub = blocks.reshape(-1, 8, 32)
    low = np.maximum(-sub.min(-1), 0)                                  # min_j >= 0
    scale = np.maximum((sub.max(-1) + low) / 15, 1e-12)
    d, dmin = scale.max(-1) / 63, np.maximum(low.max(-1), 1e-12) / 63
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(low / dmin[:, None]), 0, 63).astype(np.uint8)
    q = np.clip(np.round((sub + (dmin[:, None] * m)[..., None]) / (d[:, None] * sc)[..., None]), 0, 15).astype(np.uint8)
    scales = np.zeros((len(blocks), 12), np.uint8)
    scales[:, :4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    qs = np.concatenate([q[:, 2 * p] | (q[:, 2 * p + 1] << 4) for p in range(4)], axis=1)
    out = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                          dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), scales, qs], axis=1)
    return out.reshape(*x.shape[:-1], -1)


# Tolerances relative to the largest value: weights, then logits (measured 9.8% and 2.4%).
@pytest.mark.parametrize("qtype, tolerance, logit_tolerance", [("Q4_K", 0.1, 0.15), ("Q6_K", 0.02, 0.04)])
def test_k_quants_of_a_real_model_read_to_the_dequantised_logits(qtype, tolerance, logit_tolerance, tiny_bpe, tmp_path,
                                                                 monkeypatch):
    """A tiny model's weights as K-quant blocks: the reader gives exactly what the gguf package
    dequantises them to, and the logits are those of the dequantised weights, close to the source's."""
    import gguf
    encoders = {"Q4_K": encode_q4_k, "Q6_K": encode_q6_k}
    package_quantize = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", lambda a, qt: encoders[qt.name](a) if qt.name in encoders
                        else package_quantize(a, qt))
    monkeypatch.setattr(gguf_format, "WRITABLE_TYPES", (*gguf_format.WRITABLE_TYPES, *encoders))
    ckpt, _ = random_model("tiny", tiny_bpe, dim=256, intermediate_size=512)
    gguf_format.save(ckpt, tmp_path / "k.gguf", qtype=qtype)
    _, tensors, buf = read_gguf(tmp_path / "k.gguf")
    assert tensors["blk.0.ffn_down.weight"][1].name == qtype
    loaded = load_checkpoint(tmp_path / "k.gguf")
    reference = {}
    for name, w in ckpt.state_dict.items():
        arr = w.float().numpy()
        if arr.ndim == 2 and arr.shape[1] % 256 == 0:   # K-quantised (other rows stay F32, as llama.cpp's)
            # The package's dequantiser on our blocks (Q/K rows move whole: no permutation needed).
            arr = np.array(gguf.quants.dequantize(encoders[qtype](arr), gguf.GGMLQuantizationType[qtype]))
            assert np.abs(arr - w.numpy()).max() <= tolerance * np.abs(w.numpy()).max(), name   # a real encoding
        reference[name] = torch.from_numpy(arr).float()
        assert torch.equal(loaded.state_dict[name].float(), reference[name]), name
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    from dataclasses import replace
    exact = logits(replace(ckpt, state_dict=reference), ids)
    ours, source = logits(loaded, ids), logits(ckpt, ids)
    assert torch.equal(ours, exact)
    assert (ours - source).abs().max() <= logit_tolerance * source.abs().max()

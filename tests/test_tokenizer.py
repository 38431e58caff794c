"""Tokenizers of both kinds against their references, round trips, and chat templates."""
import pytest

from llamaforge.text.convert import from_sentencepiece_model
from llamaforge.text.tokenizer import StreamDecoder

from conftest import MIXED_TEXT, corpus_lines


def test_byte_level_bpe_matches_transformers(default_checkpoint, hf_smollm2):
    """Against transformers' own GGUF tokenizer, as it reads the file. (It leaves out SmolLM2's
    digit split, `tokenizer.ggml.pre = smollm`; the vocabulary has no token of two digits, so the
    ids agree all the same, which the numbers below check.)"""
    ours, ref = default_checkpoint.tokenizer, hf_smollm2[1]
    for text in MIXED_TEXT + ["<|im_start|>user\nhi<|im_end|>\n", " 2026 was 12345, and x=987654321"]:
        assert ours.encode(text) == ref.encode(text), text


def test_byte_level_bpe_splits_digits(default_checkpoint):
    tok = default_checkpoint.tokenizer
    ids = tok.encode("2026")
    assert len(ids) == 4 and tok.decode(ids) == "2026"


@pytest.mark.parametrize("text", MIXED_TEXT)
def test_byte_level_round_trip(default_checkpoint, text):
    tok = default_checkpoint.tokenizer
    assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_matches_sentencepiece(spm_model):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    ours = from_sentencepiece_model(spm_model)
    for text in MIXED_TEXT + corpus_lines(50, seed=7):
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert ours.encode(text) == [sp.bos_id()] + sp.encode(text)
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text))


def test_sentencepiece_uses_byte_fallback(spm_model):
    ours = from_sentencepiece_model(spm_model)
    ids = ours.encode("ŝ", add_special_tokens=False)   # a character the tiny vocabulary lacks
    assert any(ours.backend.id_to_token(i).startswith("<0x") for i in ids)
    assert ours.decode(ids) == "ŝ"


def test_stream_decoder_holds_back_partial_characters(default_checkpoint):
    tok = default_checkpoint.tokenizer
    text = "羊驼 🦙 llama"
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_keeps_sentencepiece_spaces(spm_model):
    tok = from_sentencepiece_model(spm_model)
    for text in MIXED_TEXT:
        ids = tok.encode(text, add_special_tokens=False)
        dec = StreamDecoder(tok)
        assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(default_checkpoint, hf_smollm2):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}]
    ours = default_checkpoint.tokenizer.apply_chat_template(messages)
    ref = hf_smollm2[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n")
    # No system message: SmolLM2's template inserts its own.
    default = default_checkpoint.tokenizer.apply_chat_template(messages[1:2])
    assert default == hf_smollm2[1].apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)


def test_template_errors_are_llamaforge_errors(tiny_bpe):
    from dataclasses import replace

    from llamaforge.errors import LlamaforgeError
    tok = replace(tiny_bpe, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(LlamaforgeError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])

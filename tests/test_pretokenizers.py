"""GGUF pre-tokenizer names (`tokenizer.ggml.pre`): a tokenizer exported to GGUF and read back
splits text as before, for every kind llamaforge holds, and transformers' own GGUF reader agrees."""
import json

import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from llamaforge.errors import LlamaforgeError
from llamaforge.formats import gguf as gguf_format
from llamaforge.formats.load import load_checkpoint
from llamaforge.text.convert import byte_level_bpe, from_sentencepiece_model
from llamaforge.text.pretokenizers import LLAMA3_SPLIT, PRE_TOKENIZERS, pre_tokenizer_name
from llamaforge.text.tokenizer import Tokenizer
from llamaforge.text.training import train_tokenizer

from conftest import MIXED_TEXT, corpus_lines, random_model

TEXTS = MIXED_TEXT + [
    "Call 555-0123 or 1234567890; pi is 3.14159265, 12,345.67 EUR, year 2026.",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * 0x1F;   // 42\n}\n",
    "中文文本和日本語のテキスト，한국어 텍스트도。",
    "🦙🦙 👩‍👩‍👧 🇯🇵 emoji 😀!",
    "a  b   c    d\n\n\n   e\t\tf  \r\n g     ",
    "it's I'LL we've THEY'RE don't",
]


def llama3_kind_tokenizer() -> Tokenizer:
    """A byte-level BPE with Llama 3's split and `ignore_merges`, trained here (Meta's own file
    needs a licence and a download; what matters is the kind)."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    backend.train_from_iterator(corpus_lines(800, seed=3), trainers.BpeTrainer(
        vocab_size=700, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    spec = json.loads(backend.to_str())
    spec["model"]["ignore_merges"] = True
    return Tokenizer(Backend.from_str(json.dumps(spec)), kind="bpe", bos_token=special[0], eos_token=special[1],
                     add_bos=True)


@pytest.fixture(scope="module", params=["smollm2", "trained", "sentencepiece", "llama3"])
def exported(request, default_checkpoint, spm_model, tmp_path_factory):
    """(the tokenizer, the pre name written or None, the GGUF it was exported to)."""
    kind = request.param
    tok, pre = {"smollm2": lambda: (default_checkpoint.tokenizer, "smollm"),
                "trained": lambda: (train_tokenizer(corpus_lines(800, seed=2), 600), "gpt-2"),
                "sentencepiece": lambda: (from_sentencepiece_model(spm_model), None),
                "llama3": lambda: (llama3_kind_tokenizer(), "llama-bpe")}[kind]()
    ckpt, _ = random_model("tiny", tok, vocab_size=tok.vocab_size)
    path = tmp_path_factory.mktemp("pre") / f"{kind}.gguf"
    gguf_format.save(ckpt, path)
    return tok, pre, path


def test_the_pre_tokenizer_name_written_is_what_the_tokenizer_does(exported):
    from llamaforge.formats.gguf_header import read_gguf
    tok, pre, path = exported
    assert read_gguf(path)[0].get("tokenizer.ggml.pre") == pre


def test_export_and_read_back_gives_the_same_ids(exported):
    tok, _, path = exported
    back = load_checkpoint(path).tokenizer
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text), text
        assert back.decode(back.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text), skip_special_tokens=True)


def test_transformers_reads_the_exported_tokenizer_alike(exported):
    from transformers import AutoTokenizer
    tok, _, path = exported
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        if tok.kind == "sentencepiece" and text.startswith((" ", "\t")):
            continue   # transformers' Metaspace drops SentencePiece's dummy prefix before a leading space
        assert ref.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False), text


def test_every_known_name_reads_and_an_unknown_one_is_refused(tiny_bpe):
    spec = json.loads(tiny_bpe.backend.to_str())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    for name in PRE_TOKENIZERS:
        backend = byte_level_bpe(tokens, merges, None, name)
        for text in TEXTS:
            assert backend.decode(backend.encode(text).ids) == text, (name, text)
        assert pre_tokenizer_name(backend.to_str()) in {n for n, p in PRE_TOKENIZERS.items() if p == PRE_TOKENIZERS[name]}
    with pytest.raises(LlamaforgeError, match=r"x\.gguf: tokenizer\.ggml\.pre = 'mystery-bpe'"):
        byte_level_bpe(tokens, merges, None, "mystery-bpe", source="x.gguf")


def test_a_split_no_name_describes_is_not_written(tiny_bpe, tmp_path):
    from dataclasses import replace
    backend = Backend.from_str(tiny_bpe.backend.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}{1,2}"), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ckpt, _ = random_model("tiny", replace(tiny_bpe, backend=backend))
    with pytest.raises(LlamaforgeError, match=r"odd\.gguf: .*no GGUF pre-tokenizer name"):
        gguf_format.save(ckpt, tmp_path / "odd.gguf")
    assert list(tmp_path.iterdir()) == []

"""Tokenizers from every source a checkpoint brings: an HF directory (`tokenizer.json` or a
SentencePiece `tokenizer.model`, with `tokenizer_config.json`, chat template and
`generation_config.json`), GGUF metadata of either kind (byte-level BPE `gpt2`, SentencePiece
`llama`), and Meta's `tokenizer.model`. Each becomes a `tokenizers` backend inside a `Tokenizer`.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as Backend

from ..errors import LlamaforgeError
from ..files import read_json, read_lines, read_text
from .pretokenizers import pre_tokenizer_for
from .tokenizer import Tokenizer, byte_alphabet

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6



def _token_text(tok, where: str) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return tok["content"]   # tokenizer_config.json may spell tokens as AddedToken dicts
    raise LlamaforgeError(f"{where}: expected a token (a string or {{\"content\": ...}}), found {tok!r}")


def from_hf_dir(path: Path) -> Tokenizer:
    """tokenizer.json (+ tokenizer_config.json, chat template, generation_config.json)."""
    cfg_path = path / "tokenizer_config.json"
    cfg = read_json(cfg_path) if cfg_path.exists() else {}
    if (path / "tokenizer.json").exists():
        try:
            backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise LlamaforgeError(f"{path / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
        tok = Tokenizer(backend, kind=_backend_kind(backend))
    elif (path / "tokenizer.model").exists():
        tok = from_sentencepiece_model(path / "tokenizer.model")
        tok.add_bos = cfg.get("add_bos_token", True)
    else:
        raise LlamaforgeError(f"{path}: no tokenizer.json or tokenizer.model")
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if name in cfg:
            setattr(tok, name, _token_text(cfg[name], f"{cfg_path}: {name}"))
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise LlamaforgeError(f"{cfg_path}: chat_template must be a template or a list of named ones")
    if (path / "chat_template.jinja").exists():
        template = read_text(path / "chat_template.jinja", allow_empty=True)
    elif (path / "chat_template.json").exists():
        template = read_json(path / "chat_template.json").get("chat_template", template)
    tok.chat_template = template
    if (path / "tokenizer.json").exists():
        # tokenizer.json's own post-processor decides about BOS; record what it does.
        bos = tok.bos_id
        tok.add_bos = bos is not None and tok.encode("a")[:1] == [bos]
    gen_path = path / "generation_config.json"
    if gen_path.exists():
        eos = read_json(gen_path).get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else eos or []
        if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
            raise LlamaforgeError(f"{gen_path}: eos_token_id must be a token id or a list of them")
        tok.extra_eos_ids = eos
    tok._set_bos_post_processor()
    return tok


def _backend_kind(backend: Backend) -> str:
    model = json.loads(backend.to_str())["model"]
    return "sentencepiece" if model.get("byte_fallback") else "bpe"


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int] | None, pre: str | None,
                   source: str = "GGUF") -> Backend:
    """A byte-level BPE backend (GPT-2 / Llama 3 / SmolLM2 kind) from a GGUF vocabulary, split
    before the merges as its `tokenizer.ggml.pre` name says (`pretokenizers.py`)."""
    pre_tokenizer, ignore_merges = pre_tokenizer_for(pre, source)
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, tokens, token_types)
    return backend


def sentencepiece_bpe(tokens: list[str], scores: list[float], token_types: list[int] | None,
                      add_space_prefix: bool = True) -> Backend:
    """A SentencePiece-BPE backend (Llama 1/2, TinyLlama kind) from pieces and scores.

    SentencePiece merges the adjacent pair whose joined piece scores highest; ordering merges by
    the joined piece's score reproduces that with a plain BPE model. Unknown bytes fall back to
    <0xNN> tokens.
    """
    types = token_types or [TOKEN_NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t: s for t, s, ty in zip(tokens, scores, types, strict=True) if ty in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    candidates = []
    for piece, score in mergeable.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in mergeable and right in mergeable:
                candidates.append((-score, vocab[left], vocab[right], left, right))
    candidates.sort()
    pairs = [(left, right) for _, _, _, left, right in candidates]
    unk = next((t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_UNKNOWN), None)
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # SentencePiece's dummy prefix is added even before a leading space (" x" -> "▁▁x"), which
    # Metaspace does not do; Llama 2's own tokenizer.json uses this normalizer for that reason.
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("\u2581")] if add_space_prefix else []) + [normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])])
    _add_special_tokens(backend, tokens, token_types)
    return backend


def _add_special_tokens(backend: Backend, tokens, token_types):
    # Control tokens (<s>, <|im_start|>, ...) must match whole instead of being split into pieces.
    if not token_types:
        return
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, token_types, strict=True) if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, token_types, strict=True) if ty == TOKEN_USER_DEFINED]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def from_sentencepiece_model(path: Path) -> Tokenizer:
    """A SentencePiece `tokenizer.model` (Meta format), rebuilt as a `tokenizers` backend."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception as e:
        raise LlamaforgeError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
    n = sp.GetPieceSize()
    tokens = [sp.IdToPiece(i) for i in range(n)]
    scores = [sp.GetScore(i) for i in range(n)]
    types = [TOKEN_UNKNOWN if sp.IsUnknown(i) else TOKEN_CONTROL if sp.IsControl(i)
             else TOKEN_BYTE if sp.IsByte(i) else TOKEN_UNUSED if sp.IsUnused(i) else TOKEN_NORMAL
             for i in range(n)]
    backend = sentencepiece_bpe(tokens, scores, types)
    return Tokenizer(backend, kind="sentencepiece",
                     bos_token=tokens[sp.bos_id()] if sp.bos_id() >= 0 else None,
                     eos_token=tokens[sp.eos_id()] if sp.eos_id() >= 0 else None,
                     unk_token=tokens[sp.unk_id()] if sp.unk_id() >= 0 else None,
                     pad_token=tokens[sp.pad_id()] if sp.pad_id() >= 0 else None,
                     add_bos=True)


# --- tiktoken (Llama 3's Meta format) ----------------------------------------------------------------

def is_tiktoken_file(path: Path) -> bool:
    """A tiktoken vocabulary, as Llama 3's Meta `tokenizer.model` is: lines of "base64-token rank"
    (a SentencePiece model is a protobuf)."""
    with open(path, "rb") as f:
        first = f.readline(400).split()
    return len(first) == 2 and first[1].isdigit()


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges that reproduce tiktoken on these ranks. tiktoken joins the adjacent pair whose
    join has the lowest rank, so every way of cutting a token into two tokens is a merge, ranked by
    the token's own rank (then by its parts' ranks)."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def llama3_special_tokens(count: int, llama31: bool) -> list[str]:
    """The names Meta's reference tokenizer gives the `count` special tokens after the ranks:
    Llama 3.1 and later named some of 3's reserved ones (end of message, python tag, ...)."""
    if llama31:
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        first_reserved = 3
    else:
        named = ["<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{i}|>" for i in range(4)),
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        first_reserved = 5
    reserved = [f"<|reserved_special_token_{first_reserved + i}|>" for i in range(max(0, count - len(named)))]
    return (named + reserved)[:count]


def from_tiktoken_model(path: Path, vocab_size: int | None = None, llama31: bool = True) -> Tokenizer:
    """Llama 3's tokenizer from Meta's tiktoken `tokenizer.model`: byte-level BPE with Llama 3's
    split, whole-word lookups before merges (tiktoken's), and Meta's special tokens after the
    ranks (vocab_size minus the ranks of them; 256 by default)."""
    import base64
    import binascii

    from .chat_template import LLAMA3_CHAT_TEMPLATE
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(read_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].isdigit():
            raise LlamaforgeError(f"{path}:{n}: expected a base64 token and its rank")
        try:
            ranks[base64.b64decode(fields[0], validate=True)] = int(fields[1])
        except binascii.Error:
            raise LlamaforgeError(f"{path}:{n}: not base64 ({fields[0][:40]!r})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise LlamaforgeError(f"{path}: the ranks are not 0 to {len(ranks) - 1}, each once")
    alphabet = byte_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    pre_tokenizer, _ = pre_tokenizer_for("llama-bpe", str(path))
    backend = Backend(models.BPE(vocab={spell(t): r for t, r in ranks.items()},
                                 merges=[(spell(a), spell(b)) for a, b in tiktoken_merges(ranks)], ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    specials = llama3_special_tokens((vocab_size or len(ranks) + 256) - len(ranks), llama31)
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok = Tokenizer(backend, kind="bpe", bos_token=specials[0], eos_token=specials[1], add_bos=True,
                    chat_template=LLAMA3_CHAT_TEMPLATE)
    tok.extra_eos_ids = [i for i in (tok.token_id("<|eot_id|>"), tok.token_id("<|eom_id|>")) if i is not None]
    return tok

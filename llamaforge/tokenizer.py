"""One tokenizer interface over the `tokenizers` library, plus chat templates.

Every source becomes a `tokenizers.Tokenizer`: an HF `tokenizer.json` as it is, GGUF metadata of
either kind (byte-level BPE `gpt2`, SentencePiece `llama`), and a SentencePiece `tokenizer.model`
(Meta format). Exporting to HF is then just saving that tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from .errors import LlamaforgeError

# Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre` name (llama.cpp's names).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PRE_NAMES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"}
# llama.cpp splits every digit off first for these, then applies GPT-2's pattern.
DIGIT_SPLIT_PRE_NAMES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}

# ChatML, used for models that carry no template of their own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Tokenizer:
    backend: Backend
    kind: str                              # "bpe" (byte-level) or "sentencepiece"
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos: bool = False
    chat_template: str | None = None
    extra_eos_ids: list[int] = field(default_factory=list)   # e.g. <|eot_id|> besides <|end_of_text|>

    def __post_init__(self):
        self._set_bos_post_processor()

    # --- ids -------------------------------------------------------------------------------
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self):
        return self.token_id(self.bos_token)

    @property
    def eos_id(self):
        return self.token_id(self.eos_token)

    @property
    def pad_id(self):
        pad = self.token_id(self.pad_token)
        return pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    @property
    def stop_ids(self) -> set[int]:
        """Token ids that end generation."""
        ids = set(self.extra_eos_ids)
        if self.eos_id is not None:
            ids.add(self.eos_id)
        if self.chat_template is None and self.token_id("<|im_end|>") is not None:
            ids.add(self.token_id("<|im_end|>"))   # the ChatML default template ends turns with it
        return ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # --- text <-> ids ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, (start, end) character span of each token in `text`)."""
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return render_chat_template(self.chat_template or DEFAULT_CHAT_TEMPLATE, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def _set_bos_post_processor(self):
        # BOS is added by the backend's post-processor, as in HF tokenizer.json files, so that an
        # exported tokenizer.json behaves the same in transformers.
        if self.add_bos and self.bos_id is not None:
            self.backend.post_processor = processors.TemplateProcessing(
                single=f"{self.bos_token} $A", pair=f"{self.bos_token} $A {self.bos_token} $B",
                special_tokens=[(self.bos_token, self.bos_id)])

    # --- HF format -------------------------------------------------------------------------
    def save_hf(self, out_dir: str | Path):
        out = Path(out_dir)
        self.backend.save(str(out / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "pad_token": self.pad_token, "unk_token": self.unk_token,
            "add_bos_token": self.add_bos, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        special = {k: v for k, v in cfg.items() if k.endswith("_token") and isinstance(v, str)}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


class StreamDecoder:
    """Turns a growing list of ids into text pieces as they become printable.

    Decoding token by token breaks multi-byte characters and SentencePiece's leading spaces, so
    each step decodes a short window: the tokens since the last emitted piece, with the piece
    before them as context, and emits what the new tokens add. An incomplete character (U+FFFD
    at the end) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0     # window start (context), and end of what was emitted

    def _new_text(self) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        return decode(self.ids[self.prefix:], skip_special_tokens=self.skip)[len(before):]

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        new = self._new_text()
        if not new or new.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return new

    def flush(self) -> str:
        """Whatever was held back, at the end (a character cut short decodes as U+FFFD)."""
        new = self._new_text()
        self.prefix = self.read = len(self.ids)
        return new


def render_chat_template(template: str, messages, add_generation_prompt=True, **kwargs) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **kwargs)
    except TemplateError as e:
        raise LlamaforgeError(f"chat template: {e}") from None


# --- builders -------------------------------------------------------------------------------

def _token_text(tok) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    return tok.get("content")  # tokenizer_config.json may spell tokens as AddedToken dicts


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
            setattr(tok, name, _token_text(cfg[name]))
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
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
        tok.extra_eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    tok._set_bos_post_processor()
    return tok


def _backend_kind(backend: Backend) -> str:
    model = json.loads(backend.to_str())["model"]
    return "sentencepiece" if model.get("byte_fallback") else "bpe"


def read_json(path: Path) -> dict:
    """A JSON object from a model directory's file, or a one-line error naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlamaforgeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise LlamaforgeError(f"{path}: not a JSON object")
    return value


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int] | None, pre: str | None) -> Backend:
    """A byte-level BPE backend (GPT-2 / Llama 3 / SmolLM2 kind) from a GGUF vocabulary."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in LLAMA3_PRE_NAMES))
    if pre in LLAMA3_PRE_NAMES:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in DIGIT_SPLIT_PRE_NAMES:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
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
    mergeable = {t: s for t, s, ty in zip(tokens, scores, types) if ty in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    candidates = []
    for piece, score in mergeable.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in mergeable and right in mergeable:
                candidates.append((-score, vocab[left], vocab[right], left, right))
    candidates.sort()
    pairs = [(left, right) for _, _, _, left, right in candidates]
    unk = next((t for t, ty in zip(tokens, types) if ty == TOKEN_UNKNOWN), None)
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
               for t, ty in zip(tokens, token_types) if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, token_types) if ty == TOKEN_USER_DEFINED]
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
        with open(path, "rb") as f:
            head = f.read(200).split(b"\n")[0].split(b" ")
        if len(head) == 2 and head[1].isdigit():
            raise LlamaforgeError(f"{path}: a tiktoken vocabulary (Llama 3 Meta format), which llamaforge does "
                                  "not read yet; use the model's HF or GGUF release") from None
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


# --- training a tokenizer ------------------------------------------------------------------------
# Byte-level BPE, as GPT-2, Llama 3 and SmolLM2 use: any text encodes (no unknown token), and the
# special tokens let the ChatML default template and EOS-separated documents work at once.
TRAINED_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer trained on an iterable of texts with the `tokenizers` library.

    `<|endoftext|>` is BOS, EOS and padding; the template is ChatML with `<|im_end|>` ending a turn
    (and generation, through `extra_eos_ids`).
    """
    from tokenizers import trainers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(TRAINED_SPECIAL_TOKENS) + 1:
        raise LlamaforgeError(f"vocab must be at least {len(alphabet) + len(TRAINED_SPECIAL_TOKENS) + 1} "
                              f"(256 bytes + special tokens + 1 merge), got {vocab_size}")
    backend = Backend(models.BPE())
    # GPT-2's split (words, numbers, punctuation, whitespace), then bytes.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(TRAINED_SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator(texts, trainer)
    eot, _, end = TRAINED_SPECIAL_TOKENS
    tok = Tokenizer(backend, kind="bpe", bos_token=eot, eos_token=eot, pad_token=eot, chat_template=DEFAULT_CHAT_TEMPLATE)
    tok.extra_eos_ids = [tok.token_id(end)]
    return tok


def save_trained_tokenizer(tok: Tokenizer, out_dir: str | Path):
    """An HF tokenizer directory, whole or not at all, with generation_config.json naming the
    end-of-turn token as a stop token (tokenizer_config.json has no place for a second EOS)."""
    from .atomic import atomic_output_dir
    with atomic_output_dir(out_dir) as tmp:
        tok.save_hf(tmp)
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(tok.stop_ids)}) + "\n")

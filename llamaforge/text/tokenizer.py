"""The tokenizer interface: one `Tokenizer` over the `tokenizers` library, whatever the source
(an HF `tokenizer.json`, GGUF metadata of either kind, a SentencePiece `tokenizer.model`: see
`convert.py`), and the decoder that streams text as tokens come. Exporting to HF is saving it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer as Backend
from tokenizers import processors

from ..files import write_json
from .chat_template import DEFAULT_CHAT_TEMPLATE, render_chat_template


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

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each token id stands for in the output (None: a special token, which is
        text of no output), for constrained decoding. Computed once."""
        if getattr(self, "_token_bytes", None) is None:
            special = {a.content for a in self.backend.get_added_tokens_decoder().values() if a.special}
            to_byte = {c: b for b, c in byte_alphabet().items()}
            table = []
            for i in range(self.vocab_size):
                piece = self.backend.id_to_token(i)
                if piece is None or piece in special:
                    table.append(None)
                elif self.kind == "bpe":
                    table.append(bytes(to_byte[c] for c in piece) if all(c in to_byte for c in piece)
                                 else piece.encode())   # an added token spelt as text
                elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
                    table.append(bytes([int(piece[3:5], 16)]))
                else:
                    table.append(piece.replace("\u2581", " ").encode())
            self._token_bytes = table
        return self._token_bytes

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
        write_json(out / "tokenizer_config.json", cfg)
        special = {k: v for k, v in cfg.items() if k.endswith("_token") and isinstance(v, str)}
        write_json(out / "special_tokens_map.json", special)


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


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map, in which byte-level BPE vocabularies spell their tokens:
    printable bytes stand for themselves, the other 68 for the characters from U+0100 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}

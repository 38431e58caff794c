"""Training a tokenizer on a corpus (for pretraining from scratch), saved in the HF format."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from ..errors import LlamaforgeError
from ..files import atomic_output_dir, write_json
from .chat_template import DEFAULT_CHAT_TEMPLATE
from .pretokenizers import GPT2_SPLIT
from .tokenizer import Tokenizer

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
    with atomic_output_dir(out_dir) as tmp:
        tok.save_hf(tmp)
        write_json(tmp / "generation_config.json", {"eos_token_id": sorted(tok.stop_ids)})

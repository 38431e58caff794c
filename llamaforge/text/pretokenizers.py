"""llama.cpp's names for byte-level BPE pre-tokenizers (`tokenizer.ggml.pre`), and what each
splits text by before the merges: a sequence of regular expressions, each splitting the pieces the
one before left (matches and the text between them both kept), and whether a piece that is itself
in the vocabulary skips the merges (`ignore_merges`). The regexes are those of the models' own
tokenizer.json files, which llama.cpp copies (or rewrites for its regex engine: Llama 3's
`(?i:...)` and Tekken's `\\p{Lu}` classes are kept here as the models wrote them).

Reading a GGUF builds the pre-tokenizer its name says, and refuses a name it does not know (llama.cpp
does too); writing one names what the tokenizer really does, or refuses (`pre_tokenizer_name`).
Source: llama.cpp src/llama-vocab.cpp at eb6a99c6 (the name chain and `llm_tokenizer_bpe`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers

from ..errors import LlamaforgeError

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PORO_SPLIT = ' ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+'


@dataclass(frozen=True)
class PreTokenizer:
    splits: tuple[str, ...]        # regexes, applied one after another
    ignore_merges: bool = False    # a piece already in the vocabulary is one token


_LLAMA3 = PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True)
_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", GPT2_SPLIT))
_GPT2 = PreTokenizer((GPT2_SPLIT,))
_QWEN2 = PreTokenizer((QWEN2_SPLIT,))

# Name -> what it does; several names mean the same. The first name of each kind is the one written.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # Llama 3, Falcon 3, Pixtral ...: Llama 3's pattern, whole vocabulary words unmerged.
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"), _LLAMA3),
    "dbrx": PreTokenizer((LLAMA3_SPLIT,)), "smaug-bpe": PreTokenizer((LLAMA3_SPLIT,)),
    # SmolLM / SmolLM2, StarCoder ...: every digit apart, then GPT-2's pattern.
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    _DIGITS_THEN_GPT2),
    # GPT-2's pattern (a tokenizer trained by `llamaforge tokenizer train`, Phi-2, MPT, OLMo ...).
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), _GPT2),
    # Qwen2 / Qwen2.5 and the DeepSeek-R1 distills of them: single digits.
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2),
    "deepseek-llm": PreTokenizer((
        '[\r\n]',
        '\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+',
        '\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+',
        '\\s+$',
        '[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+',
        '\\p{N}+',
    )),
    "deepseek-coder": PreTokenizer((
        '[\r\n]',
        '\\s?\\p{L}+',
        '\\s?\\p{P}+',
        '[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+',
        '\\p{N}',
    )),
    "deepseek-v3": PreTokenizer((
        '\\p{N}{1,3}',
        '[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+',
        '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+',
    )),
    "tekken": PreTokenizer((TEKKEN_SPLIT,), ignore_merges=True),     # Mistral NeMo and later
    **dict.fromkeys(("gpt-4o", "llama4"), PreTokenizer((GPT4O_SPLIT,))),
    "falcon": PreTokenizer((
        '[\\p{P}\\$\\+<=>\\^~\\|`]+',
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        '[0-9][0-9][0-9]',
    )),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), PreTokenizer((PORO_SPLIT,))),
    "viking": PreTokenizer((PORO_SPLIT, r"\p{N}")),
    # What llama.cpp does for a file without the key (old GGUFs): punctuation, GPT-2, digits.
    "default": PreTokenizer((
        '[\\p{P}\\$\\+<=>\\^~\\|]+',
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        '\\p{N}+',
        '[0-9][0-9][0-9]',
    )),
}


def pre_tokenizer_for(name: str | None, source: str):
    """The `tokenizers` pre-tokenizer and ignore_merges of a GGUF `tokenizer.ggml.pre` name;
    a name llama.cpp would not load either is an error naming it."""
    if name is None or name == "":
        name = "default"   # as llama.cpp, which warns that generation quality will suffer
    if name not in PRE_TOKENIZERS:
        raise LlamaforgeError(f"{source}: tokenizer.ggml.pre = {name!r} is a pre-tokenizer llamaforge does not know "
                              f"(known: {', '.join(sorted(PRE_TOKENIZERS))})")
    spec = PRE_TOKENIZERS[name]
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.splits]
    return pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), \
        spec.ignore_merges


def split_steps(spec: dict | None) -> list[str] | None:
    """The regexes a byte-level pre-tokenizer (tokenizer.json's `pre_tokenizer`) splits by, in
    order; None when it does anything a list of splits cannot say."""
    if not spec:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [split_steps(s) for s in spec.get("pretokenizers", [])]
        return None if any(s is None for s in steps) else [r for s in steps for r in s]
    if kind == "ByteLevel":
        return None if spec.get("add_prefix_space") else ([GPT2_SPLIT] if spec.get("use_regex", True) else [])
    if kind == "Digits":
        return [r"\p{N}" if spec.get("individual_digits") else r"\p{N}+"]
    if kind == "Split" and spec.get("behavior") == "Isolated" and not spec.get("invert"):
        return [spec["pattern"]["Regex"]] if "Regex" in spec.get("pattern", {}) else None
    return None


def pre_tokenizer_name(backend_json: str) -> str | None:
    """The llama.cpp name of what a byte-level BPE tokenizer splits by (None: no name says it)."""
    spec = json.loads(backend_json)
    steps = split_steps(spec.get("pre_tokenizer"))
    if steps is None:
        return None
    ignore = bool(spec.get("model", {}).get("ignore_merges"))
    return next((name for name, known in PRE_TOKENIZERS.items()
                 if list(known.splits) == steps and known.ignore_merges == ignore), None)

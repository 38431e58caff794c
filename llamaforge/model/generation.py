"""Text generation: prefill, one decode step, sampling, batching and streaming.

gpt-fast's shape: `prefill` runs the prompt once and fills the static KV cache, `decode_one_token`
extends it by one position, and `generate_tokens` loops, yielding each step's tokens as they come.
Batches are left-padded; padded keys are masked and positions count real tokens only, so a
prompt gives the same tokens alone or in a batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import LlamaforgeError
from ..text.tokenizer import StreamDecoder, Tokenizer
from .kernels import prepare_compile
from .llama import Llama, WindowKVCache, attention_mask


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.7          # 0 is greedy
    top_k: int | None = None
    top_p: float | None = 0.9
    min_p: float | None = None
    repetition_penalty: float = 1.0   # > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0     # OpenAI's: subtracted from the logit of a token already generated,
    frequency_penalty: float = 0.0    # and this times the number of times it was
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
                  (self.temperature is None or self.temperature >= 0, "temperature must be >= 0"),
                  (self.top_k is None or self.top_k >= 1, "top_k must be at least 1"),
                  (self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.min_p is None or 0 <= self.min_p < 1, "min_p must be in [0, 1)"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
                  (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]")]
        for ok, message in checks:
            if not ok:
                raise LlamaforgeError(message)


def sample(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V). Same order of operations as HF's
    processors: repetition penalty, temperature, top-k, top-p, min-p; OpenAI's presence and
    frequency penalties first, from `counts` (B, V), how often each token was generated."""
    return sample_from(process_logits(logits, cfg, seen, counts), cfg, generator)


def process_logits(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """The penalised, tempered and truncated fp32 logits (B, V) that tokens are drawn from; -inf
    marks what top-k, top-p and min-p left out. Greedy (temperature 0) skips the truncation."""
    logits = logits.float()
    if counts is not None and (cfg.presence_penalty or cfg.frequency_penalty):
        logits = logits - cfg.presence_penalty * (counts > 0) - cfg.frequency_penalty * counts
    if cfg.repetition_penalty != 1.0 and seen is not None:
        picked = logits.gather(1, seen)
        picked = torch.where(picked < 0, picked * cfg.repetition_penalty, picked / cfg.repetition_penalty)
        logits = logits.scatter(1, seen, picked)
    if not cfg.temperature or cfg.temperature <= 0:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - cfg.top_p
        drop[:, -1] = False                                   # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if cfg.min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample_from(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Tokens (B,) from `process_logits`' output: the best, or a draw at the temperature."""
    if not cfg.temperature or cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


# Prompts are run through the model in chunks of this many tokens: a server (serve/engine.py)
# interleaves its chunks with decode steps, and generation takes the same ones, so that a request
# computes the same numbers in either (a matmul's rounding may depend on its number of rows).
# 512 rather than 256: 16 clients of 64-512-token prompts on an AMX Xeon made 345 against 316
# tokens/s (half the chunks; matmuls of more rows), and their p95 time between tokens 84 against
# 115 ms (fewer steps carry a chunk).
PREFILL_CHUNK = 512


def prefill(model: Llama, input_ids, position_ids, key_valid, start: int = 0, chunk: int = PREFILL_CHUNK):
    """Run the prompt (B, T) through the model, filling cache slots [start, start + T) (slots
    before start already hold the prefix), `chunk` tokens at a time; last logits (B, V)."""
    T = input_ids.shape[1]
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        mask = None if key_valid is None else attention_mask(key_valid, b - a, start + a, start + b)
        logits = model(input_ids[:, a:b], None if position_ids is None else position_ids[:, a:b], mask,
                       cache_pos=start + a, last_only=True, fp32_logits=True)
    return logits[:, -1]


def decode_one_token(model: Llama, token, position_ids, cache_pos: int, key_valid):
    """One step: token (B, 1) at cache slot cache_pos; logits (B, V)."""
    mask = None if key_valid is None else attention_mask(key_valid, 1, cache_pos, cache_pos + 1)
    return model(token, position_ids, mask, cache_pos=cache_pos, fp32_logits=True)[:, -1]


def compiled_decode_step(model: Llama):
    """`decode_one_token` through torch.compile, built once per model and kept on it.

    Worth it with weight-only int8/int4, where eager per-op overhead is a third of each step
    (SmolLM2 int4 on 2 cores: 66 -> 91 tokens/s), at the price of a 15-40 s first call. Dynamic
    shapes, so the growing cache and position do not recompile.
    """
    step = getattr(model, "_compiled_decode_step", None)
    if step is None:
        import sys
        prepare_compile("--compile")
        print("compiling the decode step (once per process; about 40 s on 2 cores)...", file=sys.stderr)
        step = torch.compile(decode_one_token, dynamic=True, fullgraph=True)
        model._compiled_decode_step = step
    return step


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):   # prompts of any lengths
        if x != y:
            break
        n += 1
    return n


@torch.inference_mode()
def generate_tokens(model: Llama, prompts: list[list[int]], cfg: SamplingConfig,
                    stop_ids: set[int] = frozenset(), compile: bool = False,
                    reuse_cache: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt (B,) at each step until all stop or max_new_tokens.

    A row that has stopped keeps being fed its last token; callers ignore what it yields.
    compile: run decode steps through `compiled_decode_step`.
    reuse_cache: prefill only what follows the longest prefix this prompt shares with the tokens
    the KV cache holds from the previous generation (batch 1; a chat's growing history).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LlamaforgeError("every prompt needs at least one token")
    device = model.embed_tokens.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    total = T + cfg.max_new_tokens
    if total > model.config.max_seq_len:
        raise LlamaforgeError(f"prompt ({T} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the "
                              f"context length ({model.config.max_seq_len})")
    generator = torch.Generator(device).manual_seed(cfg.seed) if cfg.seed is not None else None

    input_ids = torch.zeros(B, T, dtype=torch.long, device=device)
    key_valid = torch.zeros(B, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):                     # left padding
        input_ids[i, T - len(p):] = torch.tensor(p, device=device)
        key_valid[i, T - len(p):] = True
    padded = any(len(p) != T for p in prompts)
    position_ids = (key_valid[:, :T].long().cumsum(-1) - 1).clamp(min=0)
    next_pos = position_ids[:, -1:] + 1
    seen = None
    if cfg.repetition_penalty != 1.0:
        # Padding is not part of a prompt: fill it with the row's first token, already counted.
        seen = torch.where(key_valid[:, :T], input_ids, input_ids[torch.arange(B), T - torch.tensor(
            [len(p) for p in prompts])][:, None])
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device) if not cfg.ignore_eos else None

    # Round the cache up so that later, slightly longer generations reuse it (and a compiled
    # decode step is not rebuilt for new buffers).
    cache_before = model.layers[0].self_attn.kv_cache
    model.setup_cache(B, min(model.config.max_seq_len, -(-total // 512) * 512))
    start = 0
    # (A window's ring holds the previous sequence's last positions, not a shared prefix's.)
    ring = isinstance(model.layers[0].self_attn.kv_cache, WindowKVCache)
    if reuse_cache and B == 1 and not ring and model.cache_tokens and model.layers[0].self_attn.kv_cache is cache_before:
        # At least the last prompt token is recomputed: its logits start the generation.
        start = min(_shared_prefix(model.cache_tokens, prompts[0]), T - 1)
    # What the cache will hold, kept up to date as tokens are fed (rows of a batch are not tracked).
    model.cache_tokens = list(prompts[0]) if B == 1 and not ring else None
    if compile and model.kv_int8:   # a compiled step does not reach Int8Rows.attend
        raise LlamaforgeError("--kv-cache int8 does not go with --compile")
    decode = compiled_decode_step(model) if compile else decode_one_token
    logits = prefill(model, input_ids[:, start:], position_ids[:, start:], key_valid if padded else None, start)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(cfg.max_new_tokens):
        token = sample(logits, cfg, seen, generator)
        yield token
        if stop is not None and stop.numel():
            done |= torch.isin(token, stop)
            if bool(done.all()):
                return
        if step == cfg.max_new_tokens - 1:
            return
        if seen is not None:
            seen = torch.cat([seen, token[:, None]], dim=1)
        if model.cache_tokens is not None:
            model.cache_tokens.append(int(token[0]))   # its keys and values enter the cache now
        logits = decode(model, token[:, None], next_pos, T + step, key_valid if padded else None)
        next_pos = next_pos + 1


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[:min(hits)], True) if hits else (text, False)


def generate(model: Llama, tokenizer: Tokenizer, prompt: str | list[str], cfg: SamplingConfig | None = None,
             chat: bool = False, compile: bool = False, **overrides) -> str | list[str]:
    """Generated text for one prompt (a str) or a batch (a list). With chat=True each prompt is a
    user message formatted by the model's chat template."""
    cfg = _with_overrides(cfg, overrides)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = generate_from_ids(model, tokenizer, [encode_prompt(tokenizer, p, chat) for p in prompts], cfg, compile)
    return texts[0] if isinstance(prompt, str) else texts


def generate_from_ids(model: Llama, tokenizer: Tokenizer, ids: list[list[int]], cfg: SamplingConfig,
                      compile: bool = False) -> list[str]:
    """Generated text for each prompt given as token ids, generated together as one batch."""
    outputs: list[list[int]] = [[] for _ in ids]
    finished = [False] * len(ids)
    stop_ids = tokenizer.stop_ids
    for token in generate_tokens(model, ids, cfg, stop_ids, compile=compile):
        for i, t in enumerate(token.tolist()):
            if finished[i]:
                continue
            if t in stop_ids and not cfg.ignore_eos:
                finished[i] = True
                continue
            outputs[i].append(t)
    return [_cut_at_stop(tokenizer.decode(o, skip_special_tokens=True), cfg.stop)[0] for o in outputs]


class TextStream:
    """The text of one generation as tokens arrive: printable pieces, with stop strings honoured
    (text that might begin a stop string is held back until it is clear that it does not).

    push(token) -> the text it releases; `stopped` once a stop string appeared (the text before it
    is released, the rest never is); finish() -> what was held back, at the end."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.decoder, self.stop = StreamDecoder(tokenizer), [s for s in stop if s]
        self.pending, self.stopped = "", False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.push(token)
        return self._release()

    def finish(self) -> str:
        if not self.stopped:
            self.pending += self.decoder.flush()
        text, self.pending = _cut_at_stop(self.pending, self.stop)[0], ""
        return text

    def _release(self) -> str:
        self.pending, hit = _cut_at_stop(self.pending, self.stop)
        if hit:
            self.stopped = True
            text, self.pending = self.pending, ""
            return text
        keep = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        text = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(text):]
        return text


def stream(model: Llama, tokenizer: Tokenizer, prompt_ids: list[int], cfg: SamplingConfig,
           compile: bool = False, reuse_cache: bool = False) -> Iterator[str]:
    """Text pieces of one generation as they become printable, honouring stop strings."""
    text = TextStream(tokenizer, cfg.stop)
    stop_ids = tokenizer.stop_ids
    for token in generate_tokens(model, [prompt_ids], cfg, stop_ids, compile=compile, reuse_cache=reuse_cache):
        t = int(token[0])
        if t in stop_ids and not cfg.ignore_eos:
            break
        piece = text.push(t)
        if piece:
            yield piece
        if text.stopped:
            return
    rest = text.finish()
    if rest:
        yield rest


def encode_prompt(tokenizer: Tokenizer, prompt: str, chat: bool = False) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return tokenizer.encode(text, add_special_tokens=False)  # the template writes BOS itself
    return tokenizer.encode(prompt)


def _with_overrides(cfg: SamplingConfig | None, overrides: dict) -> SamplingConfig:
    from dataclasses import replace
    cfg = cfg or SamplingConfig()
    unknown = set(overrides) - set(SamplingConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    return replace(cfg, **overrides)

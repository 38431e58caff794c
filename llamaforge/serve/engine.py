"""The serving engine: one scheduler thread owns a model and runs every request on it.

Continuous batching: requests join and leave the running batch at every step. A step is the
prefill chunks of waiting prompts (one chunk of `chunk` tokens at most a prompt, `prefill_tokens`
in all, so a long prompt never freezes the streams of the others) followed by one decode step of
every running sequence, each at its own position. Keys and values live in `SlotCache`: a row
(slot) per sequence; a slot keeps its tokens when its request ends, and a new prompt that shares
a prefix with them (the same system prompt, a chat's next turn) starts after it.

Requests talk to the world through a callback, called from this thread with events: a text piece
(with its token and log-probabilities), then the end (finish reason, or an error).
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import LlamaforgeError
from ..model.adapters import AdapterRows
from ..model.constrained import JSONConstraint
from ..model.generation import (
    PREFILL_CHUNK,
    SamplingConfig,
    TextStream,
    compiled_decode_step,
    decode_one_token,
    process_logits,
    sample_from,
)
from ..model.kernels import Int8Rows, cache_write, cache_write_int8, decode_attention, row_positions, with_int8_before
from ..model.quantize import prefill_rows_alone

# At most this many passes of prefill chunks in one step (see Engine._step): a bound on the passes
# a step makes, not a measured optimum. Chunks that share a pass count once.
PREFILLS_A_STEP = 4
# Where chunks share a pass, a step's prefill holds at most this many chunks' tokens: fewer, larger
# prefill steps finish a burst of prompts sooner, and running streams wait longer in those steps.
# 16 clients of 64-512-token prompts, packed, on a 2-core AMX Xeon (bench_engine.py): one chunk (512
# tokens) 4.05-4.14 s in 12 prefill steps, two 3.90 s in 6; two, three and four chunks alternating,
# twice: 4.03-4.20, 4.00-4.15, 3.93-4.05 s (within the noise), so two: a step of 1024 tokens takes
# ~0.2 s.
PREFILL_CHUNKS_A_STEP = 2


class QueueFull(Exception):
    """More requests wait than --max-queue allows."""


@dataclass
class Event:
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish: str | None = None          # "stop" | "length" | "error"
    error: str | None = None
    status: int = 500                  # of an error: 503 when the server is shutting down


@dataclass
class Request:
    prompt: list[int]
    sampling: SamplingConfig
    emit: Callable[[Event], None]
    min_tokens: int = 0
    logprobs: int | None = None        # None: none; 0: the chosen token's; k: and the k best
    constraint: JSONConstraint | None = None
    adapter: int = 0                   # 0: the base model; i: its i-th LoRA adapter
    # The engine's bookkeeping.
    id: int = field(default_factory=itertools.count().__next__)
    slot: int = -1
    cached: int = 0                    # tokens whose keys and values are in the slot
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    text: TextStream | None = None             # its detokenizer, stop strings included
    generator: torch.Generator | None = None   # seeded draws


class SlotCache:
    """Keys and values of up to `slots` sequences, one tensor per layer and kind,
    (slots, n_kv_heads, max_len, head_dim). A forward sees some rows of it (`attach`)."""

    def __init__(self, model, slots: int, max_len: int):
        c, p = model.config, model.embed_tokens.weight
        shape = (slots, c.n_kv_heads, max_len, c.head_dim)
        # int8 (kernels.use_int8_kv_cache): each position's key and value of a head as int8 with one
        # fp32 scale (quantize_kv), in k_scale and v_scale (slots, n_kv_heads, max_len).
        self.int8 = model.kv_int8
        kind = torch.int8 if self.int8 else p.dtype
        self.k = [_lazy_zeros(shape, kind, p.device) for _ in model.layers]
        self.v = [_lazy_zeros(shape, kind, p.device) for _ in model.layers]
        if self.int8:
            self.k_scale = [_lazy_zeros(shape[:3], torch.float32, p.device) for _ in model.layers]
            self.v_scale = [_lazy_zeros(shape[:3], torch.float32, p.device) for _ in model.layers]
        self.max_len = max_len
        self._views: dict[tuple[int, int], list] = {}   # (start, stop) -> each layer's (k, v) rows

    def attach(self, model, rows: slice, step: DecodeStep | None = None, decoding: bool = False):
        """Give every attention layer a view of `rows` for the next forward: a prefill's (a chunk
        at one position of every row), or a decode step's (one key per active row, each at its
        own position: `step`; or one sequence's next token: `decoding`). Every step attaches
        and detaches, so both bypass nn.Module's attribute machinery and reuse the views: 200 ->
        51 us a step (2.5% of one sequence's token before)."""
        views = self._views.get((rows.start, rows.stop))
        if views is None:
            views = self._views[rows.start, rows.stop] = [tuple(t[rows] for t in layer) for layer in self._layers()]
        decoding = decoding or step is not None
        for layer, view in zip(model.layers, views, strict=True):
            _set_kv_cache(layer.self_attn, Int8Rows(*view, step) if self.int8 else _Rows(*view, step, decoding))

    def attach_packed(self, model, segments: list[tuple[int, int, int, int]]):
        """Give every attention layer the prefill chunks of several prompts in one row (`_Packed`)."""
        for layer, (k, v, *scales) in zip(model.layers, self._layers(), strict=True):
            _set_kv_cache(layer.self_attn, _Packed(k, v, segments, scales))

    def _layers(self) -> list[tuple]:
        """Each layer's (k, v), or (k, v, k_scale, v_scale) where the cache is int8."""
        if self.int8:
            return list(zip(self.k, self.v, self.k_scale, self.v_scale, strict=True))
        return list(zip(self.k, self.v, strict=True))

    @staticmethod
    def detach(model):
        for layer in model.layers:
            _set_kv_cache(layer.self_attn, None)


def _set_kv_cache(attn, cache):
    """An attention layer's kv_cache set to a plain object (or None) without nn.Module's
    __setattr__: generate()'s cache, a submodule, is removed first."""
    if "kv_cache" in attn._modules:
        del attn.kv_cache
    attn.__dict__["kv_cache"] = cache


def _lazy_zeros(shape, dtype, device) -> torch.Tensor:
    """Zeros whose memory is taken from the OS page by page as it is first written, so a cache of
    16 slots of 4096 positions (1.5 GB for SmolLM2) costs what its sequences use. On a CPU, an
    anonymous mmap: its untouched pages are the kernel's zero page (torch.zeros writes every byte,
    and numpy's calloc asks for 2 MB huge pages, which a slot's first write fills whole)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import mmap
    size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8).view(dtype).view(shape)


@dataclass
class DecodeStep:
    """What every layer of a decode step shares: the rows that decode, where each writes its new
    key, how far each reads, and how many positions the widest reads (computed once a step)."""
    active: torch.Tensor       # (rows,) bool
    pos: torch.Tensor          # (rows,) the position of each row's new token

    def __post_init__(self):
        self.rows = self.active.nonzero().flatten()
        self.at = self.pos[self.rows]
        self.lengths = torch.where(self.active, self.pos + 1, 1)
        self.length = int(self.pos.max()) + 1
        self.dense = self.rows.numel() == self.active.numel()   # every row decodes
        self.flat: torch.Tensor | None = None                  # where new keys go (_Rows.update)


class _Rows:
    """What `Attention` calls `kv_cache.update(cache_pos, k, v)` on: rows of a SlotCache. An int
    cache_pos writes a chunk at that position of every row (a prefill); in a decode step each
    active row writes its one new key at its own position."""

    def __init__(self, k, v, step: DecodeStep | None, decoding: bool):
        self.k, self.v, self.step, self.decoding = k, v, step, decoding

    def update(self, start, k, v):
        step = self.step
        if step is None:
            end = start + k.shape[2]
            self.k[:, :, start:end], self.v[:, :, start:end] = k, v
            return self.k[:, :, :end], self.v[:, :, :end]
        if cache_write(self.k, self.v, k, v, step.rows, step.at):
            return self.k[:, :, :step.length], self.v[:, :, :step.length]
        # Elsewhere one index_copy_ into the flat (rows * heads * positions, head_dim) view: each new
        # key to (row, head, its position); advanced-index assignment costs ~3x as much.
        B, H, L, D = self.k.shape
        if step.flat is None:   # the first layer's; every layer has the same shape
            step.flat = ((step.rows[:, None] * H + torch.arange(H, device=step.rows.device)) * L
                         + step.at[:, None]).flatten()
        new_k, new_v = (t[:, :, 0] if step.dense else t[step.rows, :, 0] for t in (k, v))
        self.k.view(-1, D).index_copy_(0, step.flat, new_k.reshape(-1, D))
        self.v.view(-1, D).index_copy_(0, step.flat, new_v.reshape(-1, D))
        return self.k[:, :, :step.length], self.v[:, :, :step.length]

    def attend(self, q, k, v, attention=None):
        """A decode step's attention, each row over its own length (one sequence's: over all it
        holds): the kernel, or None (the model then uses SDPA with the step's mask). No row
        reaches past a sliding window: the engine caps its context at the window. A prefill
        chunk of one token (a prompt whose every other token was cached) keeps the prefill's
        SDPA path (a repeated request has answered alike in the tests; bit-identity with the
        first prompt's causal attention is not guaranteed)."""
        if not self.decoding:
            return None
        return decode_attention(q, k, v, None if self.step is None else self.step.lengths)


class _Packed:
    """What `Attention` calls `kv_cache.update` and `attend` on in a packed prefill: the chunks of
    several prompts side by side in one row, `segments` of (slot, position of its first token,
    start and end in the row). Each chunk's keys and values go to its own slot at its own
    position, and its queries attend to that slot's keys alone, through the layer's own causal
    attention: each prompt's numbers are those of its chunk alone."""

    def __init__(self, k, v, segments: list[tuple[int, int, int, int]], scales: list = ()):
        # The layer's whole cache (slots, Hkv, L, hd); where it is int8, its scales (slots, Hkv, L).
        self.k, self.v, self.segments, self.scales = k, v, segments, scales

    def update(self, positions, k, v):
        self.new = []
        for slot, at, a, b in self.segments:
            new_k, new_v = k[:, :, a:b], v[:, :, a:b]
            if self.scales:
                rows = slice(slot, slot + 1)
                cache_write_int8(self.k[rows], self.v[rows], self.scales[0][rows], self.scales[1][rows], new_k, new_v,
                                 *row_positions(1, at)[:2])
            else:
                self.k[slot, :, at:at + b - a], self.v[slot, :, at:at + b - a] = new_k[0], new_v[0]
            self.new.append((new_k, new_v))
        return k, v

    def held(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What segment i's chunk attends to: its slot's keys and values up to the chunk's end, (1,
        Hkv, end, hd); where the cache is int8, those before the chunk as held and its own as computed."""
        slot, at, a, b = self.segments[i]
        if not self.scales:
            return self.k[slot:slot + 1, :, :at + b - a], self.v[slot:slot + 1, :, :at + b - a]
        rows = slice(slot, slot + 1)
        new_k, new_v = self.new[i]
        return (with_int8_before(self.k[rows], self.scales[0][rows], at, new_k),
                with_int8_before(self.v[rows], self.scales[1][rows], at, new_v))

    def attend(self, q, k, v, attention):
        out = [attention(q[:, :, a:b], *self.held(i), None).transpose(1, 2)
               for i, (_, _, a, b) in enumerate(self.segments)]   # each (1, T, H, hd)
        return torch.cat(out, dim=1).transpose(1, 2)


@dataclass
class Slot:
    tokens: list[int] = field(default_factory=list)   # what its keys and values hold
    adapter: int = 0                                  # which adapter computed them
    request: Request | None = None


class Scheduler:
    """The one thread that runs every torch operation of a server: the engines' steps, and jobs
    (loading a model, embeddings, classification) between them.

    One thread, not one per model: an idle OpenMP thread team keeps its workers spinning, so a
    second thread that has ever run a parallel region halves the speed of the first on 2 cores
    (measured: generate 99 -> 40 tokens/s beside an idle thread that had run one matmul)."""

    def __init__(self, on_step: Callable | None = None):
        self.engines: list[Engine] = []
        self.jobs: list[tuple[Callable, Callable]] = []   # (work, done), run between steps
        self.on_step = on_step                            # metrics: (sequences running, waiting)
        self._wake = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="llamaforge-scheduler", daemon=True)
        self._thread.start()

    def run_job(self, work: Callable, done: Callable):
        """Run work() on the scheduler's thread between two steps, then done(result, error)."""
        with self._wake:
            self.jobs.append((work, done))
            self._wake.notify()

    def call(self, work: Callable):
        """work() on the scheduler's thread; its result (or its exception) here."""
        box, finished = {}, threading.Event()
        self.run_job(work, lambda result, error: (box.update(result=result, error=error), finished.set()))
        finished.wait()
        if box["error"] is not None:
            raise box["error"]
        return box["result"]

    def shutdown(self, reason: str = "the server is shutting down"):
        """Stop after the current step; every request running or waiting ends with an error."""
        with self._wake:
            self._running = False
            self._wake.notify()
        self._thread.join(timeout=30)
        for engine in self.engines:
            engine.fail_all(reason)

    def _loop(self):
        while True:
            with self._wake:
                while self._running and not self.jobs and not any(e.busy for e in self.engines):
                    self._wake.wait()
                if not self._running:
                    return
                jobs, self.jobs = self.jobs, []
                for engine in self.engines:
                    engine.admit()
            for work, done in jobs:
                try:
                    with torch.inference_mode():
                        result, error = work(), None
                except Exception as e:   # reported to the caller; the scheduler goes on
                    result, error = None, e
                done(result, error)
            for engine in self.engines:
                if engine.busy:
                    engine.step()
            if self.on_step:
                self.on_step(sum(e.running for e in self.engines), sum(len(e.waiting) for e in self.engines))


class Engine:
    """The continuous batching of one model (with its LoRA adapters), stepped by a Scheduler:
    submit() from any thread."""

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64, ctx: int | None = None,
                 chunk: int = PREFILL_CHUNK, prefill_tokens: int | None = None, adapter_rows: AdapterRows | None = None, scheduler: Scheduler | None = None,
                 compile: bool = False):
        self.model, self.tok = model, tokenizer
        if compile and model.kv_int8:   # a compiled step does not reach Int8Rows.attend
            raise LlamaforgeError("--kv-cache int8 does not go with --compile")
        # --compile: one sequence's decode step through torch.compile (generate --compile's).
        self.decode_one = compiled_decode_step(model) if compile else decode_one_token
        # Every slot holds a whole context: 4096 by default, not SmolLM2's 8192 or Llama 3.1's 128k.
        # A sliding window caps it too: within the window, windowed attention is all of attention
        # (the decode kernel attends to each row's whole length).
        self.ctx = min(ctx or 4096, model.config.max_seq_len, model.config.sliding_window or model.config.max_seq_len)
        self.max_batch, self.max_queue, self.chunk = max_batch, max_queue, chunk
        # Prefill chunks of at least this many tokens share one pass (`_Packed`), where every product
        # computes a row alone (see prefill_rows_alone); None: a pass each. Not with prefix-tuning
        # (its keys are not in the cache) nor for LoRA adapters (their updates' products round by
        # their shapes): those prompts take a pass each.
        prefix = any(layer.self_attn.prefix is not None for layer in model.layers)
        self.packs_from = None if prefix else prefill_rows_alone(model)
        # A step's prefill holds at most this many tokens (never less than a chunk, which would never
        # fit): two chunks where they share a pass (measured there), one where each prompt takes
        # a pass of its own (two passes of a chunk would double the wait of the running streams).
        default = PREFILL_CHUNKS_A_STEP * chunk if self.packs_from is not None else chunk
        self.prefill_tokens = max(prefill_tokens or default, chunk)
        self.cache = SlotCache(model, max_batch, self.ctx)
        self.slots = [Slot() for _ in range(max_batch)]
        self.waiting: list[Request] = []
        self.adapter_rows = adapter_rows or AdapterRows()
        self.stop_ids = tokenizer.stop_ids
        self.vocab = model.config.vocab_size
        self.scheduler = scheduler or Scheduler()   # a scheduler of its own, for tests
        with self.scheduler._wake:
            self.scheduler.engines.append(self)

    # --- from other threads ---------------------------------------------------------------------
    def submit(self, request: Request):
        with self.scheduler._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            self.waiting.append(request)
            self.scheduler._wake.notify()

    def run_job(self, work: Callable, done: Callable):
        self.scheduler.run_job(work, done)

    def shutdown(self, reason: str = "the server is shutting down"):
        self.scheduler.shutdown(reason)

    @property
    def running(self) -> int:
        return sum(s.request is not None for s in self.slots)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.running > 0

    def fail_all(self, reason: str):
        for r in [s.request for s in self.slots if s.request] + self.waiting:
            r.emit(Event(finish="error", error=reason, status=503))
        for s in self.slots:
            s.request = None
        self.waiting = []

    # --- on the scheduler's thread --------------------------------------------------------------
    def warm_up(self):
        """One decode step of a dummy token in slot 0 (which holds no tokens, so nothing reuses
        it): loads the kernels and, with --compile, compiles the step before the first request."""
        self.cache.attach(self.model, slice(0, 1))
        try:
            with torch.inference_mode():
                self.decode_one(self.model, torch.zeros(1, 1, dtype=torch.long, device=self.model.embed_tokens.weight.device),
                                None, 0, None)
        finally:
            SlotCache.detach(self.model)

    def step(self):
        try:
            with torch.inference_mode():
                self._step()
        except Exception as e:   # a failed step fails its requests, not the server
            for slot in self.slots:
                if slot.request:
                    self._finish(slot, "error", f"{type(e).__name__}: {e}")
        finally:
            SlotCache.detach(self.model)

    def admit(self):
        """Waiting requests into free slots; each takes the free slot whose tokens share the
        longest prefix with its prompt, and starts after that prefix."""
        self.waiting = [r for r in self.waiting if not r.cancelled]
        while self.waiting:
            free = [i for i, s in enumerate(self.slots) if s.request is None]
            if not free:
                return
            r = self.waiting.pop(0)
            best, neg = max((_shared(self.slots[i], r), -i) for i in free)
            r.slot, r.cached = -neg, min(best, len(r.prompt) - 1)   # the last prompt token makes the logits
            r.text = TextStream(self.tok, r.sampling.stop)
            if r.sampling.seed is not None:
                r.generator = torch.Generator().manual_seed(r.sampling.seed)
            slot = self.slots[r.slot]
            slot.request, slot.tokens, slot.adapter = r, r.prompt[:r.cached], r.adapter

    def _step(self):
        for slot in self.slots:   # a client that went away frees its slot now
            if slot.request and slot.request.cancelled:
                self._finish(slot, None)
        # Prefill chunks, oldest request first, one chunk a prompt (`chunk` tokens at most, so one long
        # prompt never freezes the others' streams), as many whole chunks as fit in `prefill_tokens`
        # (the oldest always does; a longer one waits for the next step while shorter ones go), in
        # at most PREFILLS_A_STEP passes (each has a cost of its own). A prompt is cut where it
        # would be alone (where generate() cuts it too, with the default chunk and no cached
        # prefix). Where chunks can share a pass (`packs_from`), those that can go in one: a pass
        # costs ~19 ms besides its tokens' (SmolLM2 int4: unpacking the weights, 30 layers of
        # small ops), and a burst of prompts is prefilled in fewer steps, in which the running
        # sequences wait (16 clients of 64-512 tokens: 16 passes in 12 steps -> 6 in 6).
        budget, packed, alone = self.prefill_tokens, [], []
        for slot in sorted((s for s in self.slots if s.request and s.request.cached < len(s.request.prompt)),
                           key=lambda s: s.request.arrived):
            r = slot.request
            size = min(self.chunk, len(r.prompt) - r.cached)
            if size > budget:   # a later, shorter one may still fit
                continue
            packs = self.packs_from is not None and r.adapter == 0 and size >= self.packs_from
            if len(alone) + bool(packed) == PREFILLS_A_STEP and not (packs and packed):
                continue        # it would be a pass too many
            (packed if packs else alone).append(slot)
            budget -= size
        if len(packed) > 1:
            self._prefill_packed(packed)
        for slot in alone + packed[:len(packed) == 1]:
            self._prefill(slot)
        decoding = [i for i, s in enumerate(self.slots) if s.request and s.request.cached >= len(s.request.prompt)
                    and s.request.generated]
        if decoding:
            self._decode(decoding)

    def _prefill(self, slot: Slot):
        """The next chunk of one prompt; at its end, the first token."""
        r = slot.request
        piece = r.prompt[r.cached:r.cached + self.chunk]
        self.adapter_rows.rows = torch.tensor([r.adapter])
        self.cache.attach(self.model, slice(r.slot, r.slot + 1))
        ids = torch.tensor([piece], device=self.model.embed_tokens.weight.device)
        logits = self.model(ids, cache_pos=r.cached, last_only=True, fp32_logits=True)[:, -1]
        r.cached += len(piece)
        slot.tokens = r.prompt[:r.cached]
        if r.cached == len(r.prompt):
            self._accept(slot, logits)

    def _prefill_packed(self, slots: list[Slot]):
        """The next chunks of several prompts in one pass, side by side in one row (`_Packed`), each
        computed as it is alone; at a prompt's end, its first token."""
        segments, ids, positions = [], [], []
        for slot in slots:
            r = slot.request
            piece = r.prompt[r.cached:r.cached + self.chunk]
            segments.append((r.slot, r.cached, len(ids), len(ids) + len(piece)))
            ids += piece
            positions += range(r.cached, r.cached + len(piece))
        device = self.model.embed_tokens.weight.device
        self.adapter_rows.rows = torch.tensor([0])
        self.cache.attach_packed(self.model, segments)
        pos = torch.tensor([positions], device=device)
        h = self.model.hidden_states(torch.tensor([ids], device=device), pos, None, pos[0])
        logits = self.model.logits(h[:, [end - 1 for *_, end in segments]], fp32=True)[0]   # (prompts, vocab)
        for i, (slot, (_, _, start, end)) in enumerate(zip(slots, segments, strict=True)):
            r = slot.request
            r.cached += end - start
            slot.tokens = r.prompt[:r.cached]
            if r.cached == len(r.prompt):
                self._accept(slot, logits[i:i + 1])

    def _decode(self, rows: list[int]):
        """One token for every decoding sequence, each at its own position."""
        device = self.model.embed_tokens.weight.device
        if len(rows) == 1:   # one sequence: generate()'s step (no mask, no per-row positions)
            slot = self.slots[rows[0]]
            r = slot.request
            self.adapter_rows.rows = torch.tensor([r.adapter])
            self.cache.attach(self.model, slice(rows[0], rows[0] + 1), decoding=True)
            logits = self.decode_one(self.model, torch.tensor([[r.generated[-1]]], device=device), None, r.cached, None)
            r.cached += 1
            slot.tokens.append(r.generated[-1])
            return self._accept(slot, logits)
        width = max(rows) + 1
        # Built as lists, made tensors once: an element assignment is a torch op (~100 us for 16 rows).
        tokens, pos, active, adapters = [0] * width, [0] * width, [False] * width, [0] * width
        for i in rows:
            r = self.slots[i].request
            tokens[i], pos[i], active[i], adapters[i] = r.generated[-1], r.cached, True, r.adapter
        tokens = torch.tensor(tokens, device=device)[:, None]
        pos = torch.tensor(pos, device=device)
        active = torch.tensor(active, device=device)
        adapters = torch.tensor(adapters)
        step = DecodeStep(active, pos)
        keys = torch.arange(step.length, device=device)
        mask = torch.where(active[:, None], keys[None] <= pos[:, None], keys[None] == 0)[:, None, None]
        self.adapter_rows.rows = adapters
        self.cache.attach(self.model, slice(0, width), step)
        logits = self.model(tokens, pos[:, None], mask, cache_pos=pos, fp32_logits=True)[:, -1]
        # Plain greedy rows take their tokens in one reduction over every row (per-row sampling
        # costs ~50 us a row; max's indices, the first maximum's as argmax's, take a third of
        # argmax's time on a CPU: 0.18 against 0.56 ms for 16 rows of SmolLM2's logits).
        plain = [i for i in rows if _plain_greedy(self.slots[i].request)]
        best = {}
        if plain:
            top = logits.max(-1).indices.tolist()
            best = {i: top[i] for i in plain}
        for i in rows:
            slot = self.slots[i]
            slot.request.cached += 1
            slot.tokens.append(slot.request.generated[-1])
            self._accept(slot, logits[i:i + 1], best.get(i))

    # --- one token of one request ---------------------------------------------------------------
    def _accept(self, slot: Slot, logits: torch.Tensor, token: int | None = None):
        """The next token of a request (chosen from its logits unless given): emitted, or its end."""
        r = slot.request
        token = self._choose(r, logits) if token is None else token
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        logprob, top = None, []
        if r.logprobs is not None:
            logp = torch.log_softmax(logits[0].float(), -1)
            logprob = float(logp[token])
            if r.logprobs:
                values, ids = logp.topk(r.logprobs)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
        stream = r.text
        if token in self.stop_ids and not r.sampling.ignore_eos and len(r.generated) >= r.min_tokens:
            return self._finish(slot, "stop", tail=stream.finish())
        r.generated.append(token)
        if r.constraint is not None:
            r.constraint.advance(self.tok.token_bytes()[token] or b"")
        text = stream.push(token)
        r.emit(Event(text=text, token=token, logprob=logprob, top_logprobs=top))
        if stream.stopped or r.constraint is not None and r.constraint.complete:
            return self._finish(slot, "stop", tail=stream.finish() if not stream.stopped else "")
        if len(r.generated) >= r.sampling.max_new_tokens or r.cached >= self.ctx:
            return self._finish(slot, "length", tail=stream.finish())

    def _choose(self, r: Request, logits: torch.Tensor) -> int:
        cfg = r.sampling
        if len(r.generated) < r.min_tokens and not cfg.ignore_eos:   # no end before min_tokens
            logits = logits.clone()
            logits[0, list(self.stop_ids)] = float("-inf")
        counts = None
        if cfg.presence_penalty or cfg.frequency_penalty:
            counts = torch.bincount(torch.tensor(r.generated, dtype=torch.long), minlength=self.vocab)[None].float() \
                if r.generated else torch.zeros(1, self.vocab)
        seen = torch.tensor([r.prompt + r.generated]) if cfg.repetition_penalty != 1.0 else None
        processed = process_logits(logits, cfg, seen, counts)
        if r.constraint is None:
            return int(sample_from(processed, cfg, r.generator)[0])
        return self._choose_constrained(r, processed)

    def _choose_constrained(self, r: Request, processed: torch.Tensor) -> int:
        """A token the constraint accepts: drawn as usual, a rejected one masked and the draw
        repeated (the same as drawing from the accepted tokens alone); greedy takes the best
        accepted; the value ends the generation as soon as it is complete. A generation about to
        run out of tokens writes the shortest ending instead (one token per byte at worst), so that
        what it returns always parses."""
        table = self.tok.token_bytes()
        left = min(r.sampling.max_new_tokens - len(r.generated), self.ctx - r.cached)
        tail = r.constraint.completion()
        if len(tail) >= left:   # out of room: write the shortest ending, a value that parses
            return max((t for t, b in enumerate(table) if b and tail.startswith(b)), key=lambda t: len(table[t]))
        logits = processed[0].clone()
        greedy = not r.sampling.temperature or r.sampling.temperature <= 0
        for _ in range(64 if not greedy else 0):
            t = int(sample_from(logits[None], r.sampling, r.generator)[0])
            if table[t] and r.constraint.accepts(table[t]):
                return t
            logits[t] = float("-inf")
            if torch.isinf(logits).all():
                break
        for t in torch.argsort(processed[0], descending=True).tolist():   # best first
            if table[t] and r.constraint.accepts(table[t]):
                return t
        return max((t for t, b in enumerate(table) if b and tail.startswith(b)), key=lambda t: len(table[t]))

    def _finish(self, slot: Slot, reason: str | None, error: str | None = None, tail: str = ""):
        r = slot.request
        slot.request = None
        if r and reason:
            r.emit(Event(text=tail, finish=reason, error=error))


def _plain_greedy(r: Request) -> bool:
    """Whether a request's next token is simply the best one (no sampling, penalty or constraint)."""
    cfg = r.sampling
    return (not cfg.temperature or cfg.temperature <= 0) and not cfg.presence_penalty and not cfg.frequency_penalty \
        and cfg.repetition_penalty == 1.0 and r.constraint is None \
        and (cfg.ignore_eos or len(r.generated) >= r.min_tokens)


def _shared(slot: Slot, r: Request) -> int:
    """How many leading tokens a free slot's keys and values share with a request's prompt (only
    those the same adapter computed)."""
    if slot.adapter != r.adapter:
        return 0
    n = 0
    for a, b in zip(slot.tokens, r.prompt, strict=False):
        if a != b:
            break
        n += 1
    return n

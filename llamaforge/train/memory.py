"""How much memory a training run needs per process, told before it starts, so that a run that
cannot fit stops at once with advice instead of being killed by the kernel (CPU) or running out
of CUDA memory minutes in.

The terms follow `trainer.fit`: the model's weights; the gradients, which end in fp32 on the fp32
masters; the masters themselves (a bf16 trainable parameter gets one, an fp32 parameter is its
own); AdamW's two fp32 moments per trainable parameter; the activations the backward pass needs,
from the model's shape; and the allocator's overhead. Calibrated against measured peaks
(tests/test_memory_estimate.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import LlamaforgeError
from ..model.llama import Llama
from ..model.quantize import FrozenQuantizedLinear

STRATEGIES = ("single", "ddp", "fsdp")

# Memory a step takes beyond its live tensors: freed memory the allocator keeps but cannot reuse
# for the next, differently sized, tensors, and what the first step sets up once. On the CPU
# (glibc), measured peaks exceed the live tensors by 120-730 MB in 13 configurations (SmolLM2
# and random 3-6M-parameter models; fp32 and bf16; full and LoRA; with and without
# checkpointing); this fixed part plus a fifth of what a step allocates and frees (the forward
# pass's activations, recomputed or not, and the gradients) puts every estimate within 16%.
OVERHEAD_FIXED = 128 * 2**20
OVERHEAD_CHURN = 0.2


@dataclass
class MemoryEstimate:
    """Bytes per process (rank) at the peak of a training step."""
    weights: int
    gradients: int
    optimizer: int
    masters: int
    activations: int
    overhead: int
    total: int
    note: str = ""   # what it was estimated for, for messages

    def format(self) -> str:
        terms = [("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
                 ("fp32 masters", self.masters), ("activations", self.activations), ("overhead", self.overhead)]
        lines = [f"{name:<14}{human_bytes(n):>10}" for name, n in terms]
        return "\n".join([*lines, f"{'peak total':<14}{human_bytes(self.total):>10}  ({self.note})"])

    def largest(self, n: int = 3) -> list[tuple[str, int]]:
        terms = {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                 "fp32 masters": self.masters, "activations": self.activations}
        return sorted(terms.items(), key=lambda t: -t[1])[:n]


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def estimate_training_memory(model: nn.Module, *, micro_batch_size: int, seq_len: int, strategy: str = "single",
                             world_size: int = 1, gradient_checkpointing: bool = False, master_fp32: bool = True,
                             grad_accum: int = 1, scored_tokens: int | None = None,
                             device: torch.device | str = "cpu") -> MemoryEstimate:
    """Peak memory of one rank training `model` (a Llama, or a module holding one, such as a
    classifier) as it is now: its parameters' dtypes and `requires_grad` say what trains, so add
    LoRA or a prefix first. A model on the meta device will do: no weight is read.

    micro_batch_size x seq_len: the tokens of one forward pass on this rank. scored_tokens: the
    positions whose vocabulary logits the loss computes (default: all of them for a Llama, none
    for a model with a head of its own). master_fp32: `trainer.fit`'s mixed precision (fp32
    masters, gradients and moments for bf16 parameters); False: the optimiser works on the
    parameters in their own dtype. device: where it trains (attention keeps other tensors on a GPU).
    """
    if strategy not in STRATEGIES:
        raise LlamaforgeError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    ranks = 1 if strategy == "single" else world_size
    llama = next(m for m in model.modules() if isinstance(m, Llama))
    params = list(model.parameters())   # a tied tensor once
    trainable = [p for p in params if p.requires_grad]
    # A QLoRA base's quantised weights are buffers, not parameters.
    quantized = [t for m in model.modules() if isinstance(m, FrozenQuantizedLinear) for t in m.buffers(recurse=False)]
    weights = loaded = sum(t.numel() * t.element_size() for t in [*params, *quantized])
    # Gradients as the backward pass writes them, in the parameters' dtype.
    raw_gradients = sum(p.numel() * p.element_size() for p in trainable)
    if master_fp32:
        masters = sum(p.numel() * 4 for p in trainable if p.dtype != torch.float32)
        gradients = sum(p.numel() * 4 for p in trainable)   # moved onto the masters in fp32
        optimizer = sum(p.numel() * 8 for p in trainable)
    else:
        masters, gradients, optimizer = 0, raw_gradients, 2 * raw_gradients
    if strategy == "ddp":
        gradients += raw_gradients   # DDP's all-reduce buckets: a second copy of the gradients
    if strategy == "fsdp":
        # FSDP2 as train/distributed.py sets it up: each rank keeps 1/world_size of every parameter
        # in fp32 (a shard is its own master) and of its gradient and moments. It gathers each
        # block's weights in the compute dtype while the block runs (two blocks at once, with
        # prefetching), and the root's (embeddings, final norm, output) for the whole step.
        n_all, n_trainable = sum(p.numel() for p in params), sum(p.numel() for p in trainable)
        in_blocks = sum(p.numel() for p in llama.layers.parameters())
        gathered = 2 * in_blocks // len(llama.layers) + (n_all - in_blocks)
        weights = 4 * n_all // ranks + llama.embed_tokens.weight.element_size() * gathered
        masters, gradients, optimizer = 0, 4 * n_trainable // ranks, 8 * n_trainable // ranks
        raw_gradients = gradients
    if scored_tokens is None:
        scored_tokens = micro_batch_size * seq_len if model is llama else 0
    sdpa = torch.device(device).type == "cuda"
    activations = activation_bytes(llama, micro_batch_size, seq_len, gradient_checkpointing, scored_tokens, sdpa)
    # The backward pass frees the activations as it writes the gradients: activations peak at
    # its start, gradients at its end, so a step needs the larger of the two, not their sum
    # (measured to 1% on SmolLM2; the sum would overshoot full fine-tuning by 0.5 GB). With
    # accumulation, earlier micro-batches' gradients are there all along.
    held = raw_gradients if grad_accum > 1 else 0
    forward = activation_bytes(llama, micro_batch_size, seq_len, False, scored_tokens, sdpa)
    overhead = OVERHEAD_FIXED + int(OVERHEAD_CHURN * (forward + gradients))
    # A quantised base dequantises one layer's weight at a time, and its int4 unpacking a chunk.
    overhead += max((m.out_features * m.in_features * llama.embed_tokens.weight.element_size()
                     for m in model.modules() if isinstance(m, FrozenQuantizedLinear)), default=0)
    if strategy != "single":
        # Every rank loads the whole model before DDP or FSDP takes it over, and the allocator
        # keeps what that held: SmolLM2 in bf16 on 2 CPU processes at 4 x 128 tokens each
        # measured 1.77 GB above its imports with DDP (LoRA), ~2.6 GB with FSDP (full); without
        # this term the estimates were 25-34% under (benchmarks/bench_distributed.py).
        overhead += loaded
    total = weights + masters + optimizer + max(activations + held, gradients) + overhead
    dtype = str(llama.embed_tokens.weight.dtype).removeprefix("torch.")
    note = (f"{micro_batch_size} x {seq_len} tokens, {sum(p.numel() for p in trainable):,} of "
            f"{sum(p.numel() for p in params):,} parameters trained, {dtype}"
            + (", gradient checkpointing" if gradient_checkpointing else "")
            + (f", {strategy} over {ranks} processes" if strategy != "single" else ""))
    return MemoryEstimate(weights, gradients, optimizer, masters, activations, overhead, total, note)


def activation_bytes(llama: Llama, batch: int, seq_len: int, checkpointing: bool, scored_tokens: int,
                     sdpa: bool = False) -> int:
    """What autograd keeps from the forward pass for the backward pass, at its largest; per
    block, as counted with saved-tensor hooks on the CPU (within 1% for SmolLM2 in bf16 and fp32).

    Per token and block, in the model's dtype: the inputs of the linear layers (the normalised
    input, the attention output, the normalised residual), q, k and v, and the MLP's gate, up,
    silu(gate) and their product; the softmax probabilities over the keys in fp32, and in bf16
    again as the copy the value product takes; and in fp32 (F.rms_norm computes in fp32) the
    two norms' inputs and, when the norm weights train, their normalised outputs. sdpa: on a GPU,
    training attention is SDPA's flash or memory-efficient kernel, which keeps its output and a
    log-sum-exp per head instead of the probabilities, and the loss keeps fp32 logits (not
    measured here: no GPU).
    """
    c = llama.config
    b = llama.embed_tokens.weight.element_size()
    prefix = llama.layers[0].self_attn.prefix
    keys = seq_len + (prefix.shape[2] if prefix is not None else 0)
    tokens = batch * seq_len
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_block = b * (3 * c.dim + q + 2 * kv + 4 * c.intermediate_size)
    if sdpa:
        per_block += b * q + 4 * c.n_heads
    else:
        per_block += c.n_heads * keys * (4 + (b if b < 4 else 0))
    norms_train = llama.layers[0].input_layernorm.weight.requires_grad
    per_block += 2 * 4 * c.dim * (2 if norms_train else 1)
    # The backward pass starts with the loss's logits. On a GPU, fp32: the log-softmax output it
    # kept, and next to it its gradient and the logits', 3 x 4 bytes per vocabulary entry
    # (SmolLM2's 49k vocabulary: 590 KB a token, against 1 MB for all 30 blocks in bf16). On a
    # CPU the loss runs a few rows at a time (evaluate.lm.ChunkedCrossEntropy): the logits and
    # their gradient in the model's dtype, 2 x b. Later, the block being back-propagated adds its
    # gradients, about one block's worth, and checkpointed, its recomputed activations as well.
    logits = scored_tokens * c.vocab_size * (12 if sdpa else 2 * b)
    if checkpointing:
        return tokens * c.n_layers * b * c.dim + max(logits, tokens * 2 * per_block)
    return tokens * c.n_layers * per_block + max(logits, tokens * per_block)


def available_memory(device: torch.device | str) -> int | None:
    """Memory free for a run on `device`, in bytes; None where it cannot be told.

    CUDA: what the driver reports free now. CPU: MemAvailable (free, plus what the kernel can
    reclaim), capped by a container's cgroup limit, which /proc/meminfo does not show.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            available = int(dict(line.split(":", 1) for line in f)["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):   # not Linux
        try:
            import psutil
        except ImportError:
            return None
        available = psutil.virtual_memory().available
    try:   # cgroup v2
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                available = min(available, int(limit) - int(f.read()))
    except (OSError, ValueError):
        pass
    return available


def check_fits(estimate: MemoryEstimate, available_bytes: int | None, device_name: str):
    """A LlamaforgeError naming the need, what is available and what would shrink the need, when
    the estimate exceeds it; nothing when it fits or nothing is known of the device."""
    if available_bytes is None or estimate.total <= available_bytes:
        return
    advice = []
    if estimate.activations >= estimate.total / 5:
        advice += ["--gradient-checkpointing", "a larger --grad-accum (smaller micro-steps, the same optimisation)",
                   "a shorter --max-length"]
    if estimate.optimizer + estimate.masters + estimate.gradients >= estimate.total / 5:
        advice += ["--method lora (only the adapters then have gradients and optimiser state)",
                   "FSDP over more processes (each keeps a share of the weights, gradients and optimiser state)"]
    largest = ", ".join(f"{name} {human_bytes(n)}" for name, n in estimate.largest())
    raise LlamaforgeError(f"training needs about {human_bytes(estimate.total)} per process on {device_name}, but "
                          f"{human_bytes(available_bytes)} is available ({estimate.note}; largest: {largest}). "
                          f"Try {'; '.join(advice or ['a smaller model'])}")


def reset_peak_memory(device: torch.device | str):
    """Start measuring peak memory from now (see peak_memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:   # Linux: writing 5 resets the process's VmHWM to its resident memory now
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device | str) -> int | None:
    """Bytes: on a GPU, the most that PyTorch's allocator has held; on a CPU, the process's peak
    resident memory (since reset_peak_memory, on Linux). None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

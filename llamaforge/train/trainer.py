"""The one training loop, for every task (classification, SFT, pretraining).

A task supplies the data and the loss; the loop does the rest: AdamW with decay only on 2-D
weights, warmup + linear / cosine decay, gradient accumulation and clipping, evaluation every
epoch or every N steps, the best model kept by a chosen metric, early stopping, atomic
checkpoints that resume to the same result (model, optimiser, step, RNG, data position), and
logs: tqdm progress on stderr, `metrics.json`, TensorBoard events and PNG curves.

Mixed precision: a model in bf16 computes in bf16, but each trainable parameter has an fp32
master copy that the optimiser updates (bf16 alone cannot hold a 2e-5 step on a weight of 1).
Frozen weights stay in bf16, so nothing is re-cast on every step as autocast would.

Many processes (torchrun): every rank runs this loop on its share of each global batch, the model
behind DDP or FSDP2 (`distributed.py`); checkpoints are sharded (`checkpoint.py`); rank 0 alone
logs and writes. A step computes the same at any world size and --grad-accum.
"""
from __future__ import annotations

import math
import os
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..data.batching import share
from ..errors import LlamaforgeError
from ..evaluate.metrics import plot_curves
from ..files import atomic_output_dir, keep_compiled_code, write_json
from ..model.kernels import prepare_compile, use_cpu_training_kernels
from ..model.llama import Llama
from . import checkpoint
from .adalora import RankAllocator, adalora_layers, resolve_schedule
from .distributed import Trainable, World, choose_strategy, init_world
from .memory import available_memory, check_fits, estimate_training_memory, human_bytes, peak_memory, reset_peak_memory

UNBOUNDED_EPOCHS = 1_000_000   # epochs of a run that --max-steps or --max-minutes ends


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None          # optimiser steps; overrides epochs when set
    max_minutes: float | None = None      # stop after this much training time (evaluation excluded)
    batch_size: int = 16                  # examples per optimiser step, over all processes
    grad_accum: int = 1                   # micro-steps each process cuts its share of a batch into
    lr: float = 2e-4
    warmup: float = 0.05                  # fraction of all steps (< 1) or a number of steps (>= 1)
    schedule: str = "linear"              # linear | cosine | constant (after warmup)
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None         # steps; None = at the end of each epoch
    log_every: int = 10                   # steps per training-loss record (metrics.json, TensorBoard, bar)
    save_every: int = 100                 # steps between resumable checkpoints (and at each evaluation)
    metric: str = "accuracy"              # dev metric that picks the best model
    greater_is_better: bool | None = None  # None: False for a loss or perplexity, True otherwise (as HF's)
    patience: int | None = None           # evaluations without improvement before stopping
    compile: bool | None = None           # torch.compile the blocks; None: where it pays (compile_by_default)
    # Where and how it runs; none changes what is computed, so a resumed run may change them.
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    distributed: str = "auto"             # under torchrun: ddp | fsdp | auto (DDP for adapters, FSDP2 otherwise)
    nproc: int = 1                        # > 1: start torchrun with this many processes on this machine
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine", "constant"):
            raise LlamaforgeError(f"schedule must be linear, cosine or constant, not {self.schedule!r}")
        for name in ("epochs", "batch_size", "grad_accum", "save_every", "nproc"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise LlamaforgeError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise LlamaforgeError(f"lr must be positive, got {self.lr}")
        choose_strategy(self.distributed, "full")   # a bad name fails before anything loads
        if self.greater_is_better is None:
            self.greater_is_better = not (self.metric.endswith("loss") or self.metric == "perplexity")

    def compile_measured(self) -> bool:
        """Whether this recipe's steps were measured to gain from --compile (compile_by_default):
        LoRA fine-tuning (FinetuneConfig); not pretraining."""
        return False


class Task(Protocol):
    # The global batches of an epoch, each a list of items (examples, packed rows, blocks): one
    # optimiser step each, whatever the number of processes.
    def train_batches(self, epoch: int, generator: torch.Generator) -> list[list]: ...
    def loss(self, model, items) -> tuple[torch.Tensor, int]: ...   # (summed loss, real tokens)
    def units(self, items) -> float: ...                            # what that sum counts (tokens, examples)
    def evaluate(self, model, world) -> dict: ...                   # dev metrics, each rank a share, gathered
    # optional: format_metrics(metrics) -> str, printed on stderr after each evaluation
    def save_model(self, model, out_dir: Path): ...                        # the best model


# --compile unset compiles the blocks where it was measured to pay (README "On Intel AMX"): a CPU
# LoRA run of enough steps. There an SST-2 LoRA step (16 short phrases, the cheapest step a recipe
# takes) went from 0.42 to 0.28 s compiled, and compiling cost ~70 s with torch's cache empty and
# ~10 s with the step in it (files.keep_compiled_code keeps it): it pays after ~70 steps once this
# machine has compiled the same blocks (compile_marker), ~500 before. Costlier steps gain more.
COMPILE_MIN_STEPS = {"cached": 100, "first": 500}


def compile_by_default(cfg: TrainConfig, steps: int, world: World, strategy: str | None, cached: bool) -> bool:
    from ..model.kernels import compile_missing
    return (world.device.type == "cpu" and strategy != "fsdp" and cfg.compile_measured()
            and steps >= COMPILE_MIN_STEPS["cached" if cached else "first"]
            and (cfg.max_minutes is None or cfg.max_minutes >= 3) and compile_missing() is None)


def compile_marker(llama: Llama, cfg: TrainConfig) -> Path | None:
    """A file beside torch's compiled code that says this machine compiled these blocks' training
    step (torch, the model's shape, the block's layers and which of their parameters train):
    written after a step that ran them compiled, gone when that cache is emptied. None where that
    directory cannot be written (then nothing compiles by default either)."""
    import hashlib
    block = llama.layers[0]
    key = "\n".join([torch.__version__, repr(llama.config), repr(block), str(cfg.gradient_checkpointing),
                     *(f"{n} {tuple(p.shape)} {p.dtype} {p.requires_grad}" for n, p in block.named_parameters())])
    marks = keep_compiled_code() / "llamaforge-compiled"
    try:
        marks.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return marks / hashlib.sha256(key.encode()).hexdigest()[:16] if os.access(marks, os.W_OK) else None


def resolve_compile(cfg: TrainConfig, llamas: list[Llama], steps: int, world: World, strategy: str | None):
    """(whether this run compiles the blocks, the marker still to write after a compiled step, or None).
    An unset --compile is decided here, by rank 0 for every rank, and written into cfg, so that
    the model card (and `reproduce`) records what ran."""
    if not llamas:
        return bool(cfg.compile), None
    marker = compile_marker(llamas[0], cfg) if cfg.compile is not False else None
    cached = marker is not None and marker.exists()
    compiled = cfg.compile
    if compiled is None:
        compiled = marker is not None and compile_by_default(cfg, steps, world, strategy, cached)
        compiled = bool(world.from_main(compiled))   # a collective: every rank calls it
        cfg.compile = compiled
        if compiled:
            world.log(f"llamaforge: compiling the blocks' training step for this run's {steps} steps "
                      f"(--compile false to skip): " + ("~10 s, from torch's cache" if cached else
                                                        "~70 s on 2 cores, once: later runs find it cached"))
    return compiled, (marker if compiled and not cached else None)


def mark_compiled(marker: Path, llamas: list[Llama]) -> bool:
    """Write the marker if a step has run the blocks compiled (a step of one row or one position
    runs them eager: Llama.hidden_states); whether it is done with (written, or unwritable)."""
    if not any(m.ran_compiled for m in llamas):
        return False
    try:
        marker.touch()
    except OSError:   # a cache that cannot be written only costs the next run its default
        pass
    return True


def lr_at(step: int, total: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warmup, then linear / cosine decay to 0 at the last step, or, under a time budget,
    when the budget runs out if that comes first (so a 10-minute run still anneals)."""
    warmup = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    if cfg.schedule == "constant" or total <= warmup:
        return cfg.lr
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (1 - progress)


def optimizer_groups(named_params, weight_decay: float) -> list[dict]:
    """Decay 2-D weights (matrices, embeddings, LoRA factors); not norms and biases."""
    decay = [p for _, p in named_params if p.dim() >= 2]
    no_decay = [p for _, p in named_params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainState:
    step: int = 0              # optimiser steps taken
    epoch: int = 0
    batch: int = 0             # global batches of `epoch` already consumed (one an optimiser step)
    train_seconds: float = 0.0
    tokens: int = 0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped: str | None = None


def fit(model: torch.nn.Module, task: Task, cfg: TrainConfig, run_dir: str | Path, resume: bool = False,
        world: World | None = None) -> dict:
    """Train `model` on `task`; returns {"evals": [...], "train": [...], "state": {...}}.

    run_dir gets: checkpoint/ (resumable, see checkpoint.py), best/ (via task.save_model),
    metrics.json, tensorboard/, curves.png. Under torchrun every rank calls fit; rank 0 alone
    logs and writes files.
    """
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    world = world or init_world(cfg.device)
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoint"
    if not any(p.requires_grad for p in model.parameters()):
        raise LlamaforgeError("nothing to train: the model has no trainable parameters")
    llamas = [m for m in model.modules() if isinstance(m, Llama)]   # (a classifier holds one)
    for llama in llamas:
        llama.gradient_checkpointing(cfg.gradient_checkpointing)
    if world.device.type == "cuda" and not torch.cuda.is_bf16_supported() and \
            any(p.dtype == torch.bfloat16 for p in model.parameters()):
        raise LlamaforgeError(f"{torch.cuda.get_device_name(world.device)} has no bf16: train with --dtype fp32")
    strategy = choose_strategy(cfg.distributed, getattr(cfg, "method", "full")) if world.distributed else None
    if world.device.type == "cpu" and strategy != "fsdp":   # (FSDP's parameters are shards)
        for llama in llamas:   # eager steps' norms and SwiGLU in bf16; compiled blocks fuse their own
            use_cpu_training_kernels(llama)
    if cfg.compile and strategy == "fsdp":   # the compiled blocks are called around FSDP's hooks
        raise LlamaforgeError("--compile does not combine with FSDP yet: use --distributed ddp, or leave out --compile")
    if llamas:   # the models whose shape the estimate knows
        check_memory(model, cfg, world, strategy)
    reset_peak_memory(world.device)   # training's peak, not the loader's
    trainable = Trainable(model, task, world, strategy)
    params = trainable.params
    if world.distributed:
        held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for _, p in params)
        world.log(f"llamaforge: {world.size} processes on {world.device.type}, {strategy}: each holds {held:,} of "
                  f"{sum(p.numel() for _, p in params):,} trainable parameters")
    # fp32 master copies of the trainable parameters; the optimiser only ever sees these. An fp32
    # parameter is its own master (a copy would only cost memory and a copy-back per step); so is
    # every FSDP shard (kept in fp32, see distributed.py).
    masters = [(n, p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True))
               for n, p in params]
    low_precision = [(m, p) for (_, m), (_, p) in zip(masters, params, strict=True) if m is not p]
    # The fused kernel updates every tensor in one pass: for SmolLM2's 135M parameters on 2 cores,
    # 0.07 s a step against 0.35 s for the default per-tensor loop, measured alone; inside a full
    # fine-tuning step in bf16 at 8 x 128 tokens it saves less (2.84 -> 2.73 s). It is also what
    # HF's Trainer uses by default.
    optimizer = torch.optim.AdamW(optimizer_groups(masters, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  fused=True)
    state, history = TrainState(), {"evals": [], "train": []}
    steps_per_epoch = len(task.train_batches(0, _epoch_generator(cfg.seed, 0)))
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    allocator = adalora_allocator(model, params, masters, cfg, total, strategy)

    if resume:
        if not checkpoint.exists(ckpt_dir):
            raise LlamaforgeError(f"{ckpt_dir}: no checkpoint to resume from")
        meta = checkpoint.load(ckpt_dir, masters, optimizer, allocator.tensors() if allocator else None)
        with torch.no_grad():
            for m, p in low_precision:
                p.copy_(m)
        state = TrainState(**meta["state"])
        history = meta["history"]
        if allocator:   # the budget as planned when the run began, whatever its new length
            allocator.restore(meta["adalora"])
    else:
        torch.manual_seed(cfg.seed)
    if state.stopped:
        if not _limits_raised(state, cfg, total):
            if world.main:
                print(f"llamaforge: {run_dir}: the run already finished ({state.stopped}); raise --epochs, --max-steps, "
                      f"--max-minutes or --patience to go on", file=sys.stderr)
            return {**history, "state": asdict(state)}
        state.stopped = None   # it goes on where it stopped
        state.bad_evals = 0 if cfg.patience is None else min(state.bad_evals, cfg.patience - 1)

    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=state.step if resume else None) if world.main else None
    # A run bounded only by time has no meaningful step total to show.
    bar = tqdm(total=None if cfg.epochs >= UNBOUNDED_EPOCHS and not cfg.max_steps else total, initial=state.step,
               desc="train", unit="step", file=sys.stderr, dynamic_ncols=True, disable=not world.main)

    def save_checkpoint():
        meta = {"state": asdict(state), "history": history}
        if allocator:
            meta["adalora"] = allocator.state()
        checkpoint.save(ckpt_dir, masters, optimizer, meta, world, allocator.tensors() if allocator else None)

    def evaluate():
        t0 = time.perf_counter()
        with trainable.eval_model() as eval_model:
            eval_model.eval()
            with torch.no_grad():
                metrics = task.evaluate(eval_model, world)
            record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 3),
                      "train_minutes": round(state.train_seconds / 60, 3),
                      "eval_seconds": round(time.perf_counter() - t0, 2), **metrics}
            history["evals"].append(record)
            if cfg.metric not in metrics:
                raise LlamaforgeError(f"metric {cfg.metric!r} is not among the dev metrics ({', '.join(metrics)})")
            value = metrics[cfg.metric]
            improved = state.best is None or (value > state.best if cfg.greater_is_better else value < state.best)
            if improved:
                state.best, state.best_step, state.bad_evals = value, state.step, 0
                if world.main:
                    with atomic_output_dir(run_dir / "best", replace=True) as d:
                        task.save_model(eval_model, d)
            else:
                state.bad_evals += 1
            eval_model.train()
        world.barrier()   # the best model is written before any rank goes on
        if world.main:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"dev/{k}", v, state.step)
            write_metrics(run_dir, history)
            plot_curves(history, cfg.metric, run_dir / "curves.png")
            bar.write(f"step {state.step}: dev {cfg.metric} {value:.4f}" + (" (best)" if improved else ""), file=sys.stderr)
            if hasattr(task, "format_metrics"):   # e.g. the classification report as a table
                bar.write(task.format_metrics(metrics), file=sys.stderr)
        if cfg.patience is not None and state.bad_evals >= cfg.patience:
            state.stopped = f"early stop: no better dev {cfg.metric} in {cfg.patience} evaluations"

    compiled, marker = resolve_compile(cfg, llamas, total - state.step, world, strategy)
    if compiled:
        prepare_compile("--compile")
        for llama in llamas:
            llama.compile_for_training()
    model.train()
    window_loss, window_n = 0.0, 0
    shares = world.size * cfg.grad_accum
    while state.step < total and not state.stopped:
        batches = task.train_batches(state.epoch, _epoch_generator(cfg.seed, state.epoch))
        while state.batch < len(batches) and state.step < total and not state.stopped:
            t0 = time.perf_counter()
            batch = batches[state.batch]
            # Every loss is a sum over the whole global batch's count (its tokens or examples),
            # whichever rank and micro-step computes which share; DDP and FSDP average gradients
            # over ranks, hence the world size.
            units = max(task.units(batch), 1e-12)   # (a batch that scores nothing adds nothing)
            scale = world.size / units
            loss_sum, n_tokens = 0.0, 0
            for a in range(cfg.grad_accum):
                items = share(batch, a * world.size + world.rank, shares)
                with trainable.no_sync(last=a == cfg.grad_accum - 1):
                    # A rank without a share of a short batch still runs the model (its
                    # collectives must meet the others'), on one item, weighted 0.
                    loss, tokens = trainable.step(items or batch[:1])
                    objective = loss * (scale if items else 0.0)
                    if allocator and a == cfg.grad_accum - 1:   # AdaLoRA's regulariser, once a step
                        objective = objective + allocator.schedule.orth_reg_weight * allocator.penalty()
                    objective.backward()
                if items:
                    loss_sum, n_tokens = loss_sum + float(loss.detach()), n_tokens + tokens
            loss_sum, n_tokens = world.sum([loss_sum, n_tokens])
            window_loss += loss_sum / units
            state.tokens += int(n_tokens)
            state.batch += 1
            # Gradients of a bf16 model move to the fp32 masters; the step is taken there and
            # copied back.
            for m, p in low_precision:
                m.grad = p.grad.float() if p.grad is not None else None
                p.grad = None
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([m for _, m in masters], cfg.max_grad_norm)
            budget = state.train_seconds / (cfg.max_minutes * 60) if cfg.max_minutes else 0.0
            lr = lr_at(state.step, total, cfg, budget)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.step()
            if allocator:   # AdaLoRA: importance from this step's gradients, then the masks
                allocator.step(state.step)
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for m, p in low_precision:
                    p.copy_(m)
            state.step += 1
            state.train_seconds += time.perf_counter() - t0
            if marker is not None and world.main and mark_compiled(marker, llamas):
                marker = None
            window_n += 1
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == total:
                mean_loss = window_loss / window_n
                history["train"].append({"step": state.step, "loss": round(mean_loss, 5), "lr": lr,
                                         "train_seconds": round(state.train_seconds, 2)})
                if world.main:
                    writer.add_scalar("train/loss", mean_loss, state.step)
                    writer.add_scalar("train/lr", lr, state.step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{state.tokens / max(state.train_seconds, 1e-9):.0f}")
                window_loss, window_n = 0.0, 0
            if cfg.max_minutes is not None:   # rank 0's clock decides, for every rank alike
                state.train_seconds = world.from_main(state.train_seconds)
                if state.train_seconds >= cfg.max_minutes * 60:
                    state.stopped = f"time budget of {cfg.max_minutes} minutes reached"
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                evaluate()
                save_checkpoint()
            elif state.step % cfg.save_every == 0:
                save_checkpoint()
        if state.batch >= len(batches):   # epoch complete
            state.epoch, state.batch = state.epoch + 1, 0
            if not cfg.eval_every:
                evaluate()
                save_checkpoint()
    if not history["evals"] or history["evals"][-1]["step"] != state.step:
        evaluate()   # the final model is always evaluated, so "best" covers it
    state.stopped = state.stopped or "done"
    peak = peak_memory(world.device)
    if peak is not None:
        history["peak_memory_mb"] = round(peak / 2**20)
        world.log(f"llamaforge: peak memory while training: {human_bytes(peak)} "
                  f"({'allocated on ' + str(world.device) if world.device.type == 'cuda' else 'resident, this process'})")
    save_checkpoint()
    bar.close()
    if writer:
        writer.close()
    return {**history, "state": asdict(state)}


def adalora_allocator(model, params, masters, cfg, total: int, strategy: str | None) -> RankAllocator | None:
    """The rank allocator of a model with AdaLoRA layers (their schedule given the run's length),
    working on the fp32 masters the optimiser updates; None for any other model."""
    if not adalora_layers(model):
        return None
    if strategy == "fsdp":
        raise LlamaforgeError("AdaLoRA does not combine with FSDP (its masks need whole matrices): use --distributed ddp")
    if cfg.epochs >= UNBOUNDED_EPOCHS and not cfg.max_steps:
        raise LlamaforgeError("AdaLoRA plans its rank budget over the run's steps: give --max-steps or --epochs "
                              "(--max-minutes may still cap the run)")
    resolve_schedule(adalora_layers(model)[0][1].schedule, total, getattr(cfg, "adalora_tinit", None),
                     getattr(cfg, "adalora_tfinal", None))
    master_of = {id(p): m for (_, p), (_, m) in zip(params, masters, strict=True)}
    return RankAllocator(model, lambda p: master_of[id(p)])


def check_memory(model, cfg: TrainConfig, world: World, strategy: str | None):
    """The memory a step will take on each rank, printed before training starts; a clear error
    with advice, instead of the kernel's OOM kill minutes later, when it cannot fit."""
    micro = max(1, math.ceil(cfg.batch_size / (world.size * cfg.grad_accum)))
    seq_len = getattr(cfg, "max_length", None) or getattr(cfg, "block_size", None) or 512
    estimate = estimate_training_memory(model, micro_batch_size=micro, seq_len=seq_len, strategy=strategy or "single",
                                        world_size=world.size, gradient_checkpointing=cfg.gradient_checkpointing,
                                        grad_accum=cfg.grad_accum, device=world.device)
    world.log(f"llamaforge: memory per process, estimated for {micro} x {seq_len} tokens a micro-step:\n"
              + textwrap.indent(estimate.format(), "  "))
    available = available_memory(world.device)
    if available is not None and world.device.type == "cpu":   # the processes of one machine share it
        available //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    check_fits(estimate, available, str(world.device))


def _limits_raised(state: TrainState, cfg: TrainConfig, total: int) -> bool:
    """Whether a finished run's limits, as resumed, leave it more to do than when it stopped."""
    if state.step >= total:
        return False
    if state.stopped.startswith("time budget"):
        return cfg.max_minutes is None or state.train_seconds < cfg.max_minutes * 60
    if state.stopped.startswith("early stop"):
        return cfg.patience is None or state.bad_evals < cfg.patience
    return True   # "done": a total that has grown


def write_metrics(run_dir: Path, history: dict, final: dict | None = None):
    """metrics.json: every evaluation, the training curve, and (at the end of a recipe) the final
    metrics of the best model; the resumable state stays in the checkpoint."""
    record = {k: v for k, v in history.items() if k != "state"}
    if final is not None:
        record["final"] = final
    write_json(Path(run_dir) / "metrics.json", record)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Data order depends on (seed, epoch) only, so a resumed run sees the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)

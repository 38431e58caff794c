"""One training run over many processes, on PyTorch's own engine.

`torchrun --nproc-per-node N -m llamaforge finetune ...` (or `--nproc N`, which starts torchrun
itself) gives each process RANK, WORLD_SIZE and LOCAL_RANK; `init_world` joins the process group
(gloo on CPUs, nccl on GPUs) and says where this rank computes. `wrap_for_training` puts the
model behind DDP (every rank a whole replica, gradients all-reduced) or FSDP2 `fully_shard`
(parameters, gradients and optimiser state split across ranks, each block gathered for its own
forward and backward). Without torchrun a run is one process, and nothing here talks to anyone.

The global batch is the same at any world size: each optimiser step takes one batch of the
task's list, cut into world size x grad-accum shares (`share`), and every loss is a sum divided
by the whole batch's count (tokens or examples), so that 2 ranks compute what 1 rank with 2
accumulation steps does.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import LlamaforgeError
from ..model.device import resolve_device

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """The rank that prints, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def gather(self, obj) -> list:
        """obj of every rank, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj):
        """Rank 0's obj on every rank (a decision all ranks must take alike)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def log(self, message: str):
        """A line on stderr, from rank 0 only."""
        if self.main:
            print(message, file=sys.stderr)


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_world(device: str = "auto") -> World:
    """This process's place in the run; joins the process group when torchrun started it."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World(device=resolve_device(device))
    rank, size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    where = resolve_device(device)
    if where.type == "cuda":
        if where.index is None:   # one GPU per process on each machine
            if local_rank >= torch.cuda.device_count():
                raise LlamaforgeError(f"rank {rank}: {torch.cuda.device_count()} CUDA device(s) on this machine for "
                                      f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} processes; start at most one per GPU")
            where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
        atexit.register(_close)
    return World(rank, size, local_rank, where)


def _close():
    if dist.is_initialized():
        dist.destroy_process_group()


def choose_strategy(requested: str, method: str) -> str:
    """auto: DDP for adapters (few trainable parameters: a replica each costs little), FSDP2 for
    full fine-tuning and pretraining (where gradients and optimiser state dominate memory)."""
    if requested not in STRATEGIES:
        raise LlamaforgeError(f"distributed must be one of {', '.join(STRATEGIES)}, not {requested!r}")
    if requested != "auto":
        return requested
    return "ddp" if method in ("lora", "adalora", "prefix") else "fsdp"


class TrainStep(nn.Module):
    """The model and the task's loss as one module, so that DDP and FSDP see the whole training
    forward pass through their own `forward` (a task calls the model's methods, not only its
    forward)."""

    def __init__(self, model: nn.Module, task):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, items):
        return self.task.loss(self.model, items)


class Trainable:
    """The model as the training loop drives it on this rank: `step` (the loss module, maybe
    wrapped), `params` (the trainable parameters by name: DTensor shards under FSDP),
    `eval_model()` (a whole model to evaluate and save), `no_sync(last)` (a context for
    accumulation micro-steps)."""

    def __init__(self, model: nn.Module, task, world: World, strategy: str | None):
        self.world, self.strategy, self.model = world, strategy, model
        model.to(world.device)
        step = TrainStep(model, task)
        self._shadow = None
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            ids = [world.device.index] if world.device.type == "cuda" else None
            # Buffers (a QLoRA base's quantised weights, AdaLoRA's masks) are the same on every
            # rank by construction: broadcasting them before each forward would resend a 7B
            # base's 4 GB every step.
            step = DistributedDataParallel(step, device_ids=ids, broadcast_buffers=False)
        elif strategy == "fsdp":
            step = self._fully_shard(step)
        self.step = step
        self.params = [(n.removeprefix("module.").removeprefix("model."), p) for n, p in step.named_parameters()
                       if p.requires_grad]

    def _fully_shard(self, step: TrainStep) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from ..model.llama import Block
        model = step.model
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        # A whole model to evaluate and save: a copy without its parameters' storage (filled
        # from the shards only while it is used); its buffers, RoPE's, are its own.
        empty = {id(p): nn.Parameter(torch.empty(0, dtype=p.dtype, device=p.device), requires_grad=p.requires_grad)
                 for p in model.parameters()}
        self._shadow = copy.deepcopy(model, memo=empty)
        # Shards are kept in fp32, the optimiser's precision; a bf16 run computes in bf16 (the
        # gathered parameters are cast) and reduces gradients in fp32. Block by block, so that
        # no rank ever holds the whole model in fp32.
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        for block in blocks:
            fully_shard(block.float(), mp_policy=policy)
        with torch.no_grad():
            for p in model.parameters():
                if id(p) not in in_blocks:
                    p.data = p.data.float()
        return fully_shard(step, mp_policy=policy)

    def no_sync(self, last: bool):
        """Gradients are exchanged once per optimiser step, after its last micro-step."""
        if self.strategy == "ddp" and not last:
            return self.step.no_sync()
        if self.strategy == "fsdp":
            self.step.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def eval_model(self):
        """The whole model, for evaluation and saving: the model itself, or under FSDP a copy
        gathered from the shards (on every rank: each evaluates a share of the data)."""
        if self._shadow is None:
            yield self.model
            return
        # Gathered one parameter at a time (every rank in the same order), each cast at once to
        # the model's dtype: never a whole fp32 copy.
        shards = dict(self.step.named_parameters())
        with torch.no_grad():
            for name, p in self._shadow.named_parameters():
                p.data = shards["model." + name].full_tensor().to(dtype=p.dtype)
        try:
            yield self._shadow
        finally:
            _release(self._shadow)


def _release(model: nn.Module):
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def relaunch_under_torchrun(nproc: int, argv: list[str]):
    """`--nproc N`: this command again, as N processes on this machine, under torchrun (which
    ends the whole job when one process fails). Without --nproc itself: torchrun's parser takes
    it for an abbreviation of its own --nproc-per-node, wherever it stands."""
    argv = [a for i, a in enumerate(argv) if not (a == "--nproc" or a.startswith("--nproc=")
                                                   or (i and argv[i - 1] == "--nproc"))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "llamaforge", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)

"""Resumable checkpoints: torch.distributed.checkpoint (DCP) for the tensors, JSON for the rest.

    checkpoint/latest          the name of the last complete checkpoint (replaced atomically)
    checkpoint/ckpt-<step>-<n>/  DCP shards (*.distcp, .metadata) of the fp32 master weights and
                                 AdamW's moments by parameter name, and meta.json (step, data
                                 position, history, RNG)

Every rank writes its own shards into `.saving/`; rank 0 then completes it with meta.json,
renames it and points `latest` at it, so a kill at any moment leaves the previous checkpoint
whole. DCP reshards on load: a run saved by 2 processes (FSDP shards or DDP replicas) resumes
with 1 or 4. Checkpoints of earlier llamaforge versions (`checkpoint/state.pt`) still load.
"""
from __future__ import annotations

import base64
import contextlib
import json
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import LlamaforgeError
from ..files import atomic_write_text
from .distributed import World

SAVING = ".saving"


def exists(ckpt_dir: Path) -> bool:
    return (ckpt_dir / "latest").exists() or (ckpt_dir / "state.pt").exists()


def latest(ckpt_dir: Path) -> Path:
    return ckpt_dir / (ckpt_dir / "latest").read_text().strip()


def read_meta(ckpt_dir: Path) -> dict:
    """The last checkpoint's state and history, without its tensors."""
    return json.loads((latest(ckpt_dir) / "meta.json").read_text())


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that a process outside torch.distributed saves alone: that is what it is for here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _tensors(masters, optimizer, extra: dict | None = None) -> dict:
    """What DCP saves and loads in place: masters and AdamW state by parameter name, and `extra`
    tensors by name (AdaLoRA's importance statistics). Before the first step AdamW has no state;
    it is made here (zeros) so that a load has tensors to fill."""
    state = {}
    for name, m in masters:
        s = optimizer.state[m]
        if not s:
            s["step"] = torch.zeros((), dtype=torch.float32, device=m.device if _fused(optimizer) else "cpu")
            s["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
        state[name] = s
    return {"masters": dict(masters), "optimizer": state, **({"extra": extra} if extra else {})}


def _fused(optimizer) -> bool:
    return any(g.get("fused") for g in optimizer.param_groups)


def save(ckpt_dir: Path, masters: list, optimizer, meta: dict, world: World, extra: dict | None = None):
    import torch.distributed.checkpoint as dcp
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    saving = ckpt_dir / SAVING
    if world.main and saving.exists():
        shutil.rmtree(saving)   # what a killed save left
    world.barrier()
    with _quiet_single_process():
        dcp.save(_tensors(masters, optimizer, extra), checkpoint_id=str(saving))
    world.barrier()   # every rank's shards are written
    if world.main:
        meta = {**meta, "rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
        atomic_write_text(saving / "meta.json", json.dumps(meta))
        n = 1 + max((int(p.name.rsplit("-", 1)[1]) for p in ckpt_dir.glob("ckpt-*-*")), default=0)
        name = f"ckpt-{meta['state']['step']}-{n}"
        saving.rename(ckpt_dir / name)
        atomic_write_text(ckpt_dir / "latest", name + "\n")
        for old in list(ckpt_dir.glob("ckpt-*-*")) + [ckpt_dir / "state.pt"]:
            if old.name != name:
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    world.barrier()


def load(ckpt_dir: Path, masters: list, optimizer, extra: dict | None = None) -> dict:
    """Fill masters, optimizer state and `extra` from the last checkpoint; returns its meta
    (state, history). Works at any world size."""
    if not (ckpt_dir / "latest").exists():
        return _load_legacy(ckpt_dir / "state.pt", masters, optimizer)
    import torch.distributed.checkpoint as dcp
    path = latest(ckpt_dir)
    meta = read_meta(ckpt_dir)
    tensors = _tensors(masters, optimizer, extra)
    try:
        with _quiet_single_process():
            dcp.load(tensors, checkpoint_id=str(path))
    except Exception as e:   # DCP names the missing or mismatched key
        raise LlamaforgeError(f"{path}: does not fit this model ({str(e).splitlines()[0][:300]}); was the run "
                              f"started with other settings?") from None
    rng = torch.frombuffer(bytearray(base64.b64decode(meta.pop("rng"))), dtype=torch.uint8)
    torch.set_rng_state(rng.clone())
    return meta


def _load_legacy(path: Path, masters: list, optimizer) -> dict:
    """A single-process checkpoint of llamaforge before DCP: one torch.save file."""
    saved = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle objects
    with torch.no_grad():
        for n, m in masters:
            if n not in saved["masters"]:
                raise LlamaforgeError(f"{path}: no tensor for trainable parameter {n}; was the run "
                                      f"started with other settings?")
            m.copy_(saved["masters"][n])
    optimizer.load_state_dict(saved["optimizer"])
    for g in optimizer.param_groups:   # a checkpoint from before the fused kernel would turn it off
        g["fused"] = True
    torch.set_rng_state(saved["rng"])
    return {"state": saved["state"], "history": json.loads(saved["history"])}

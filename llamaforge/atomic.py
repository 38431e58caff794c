"""Atomic writes: every file or directory llamaforge produces appears whole or not at all, so an
interrupted run or export never leaves a half-written result, and never spoils an older one."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import LlamaforgeError


def atomic_write_text(path: str | os.PathLike, text: str):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_torch_save(obj, path: str | os.PathLike):
    import torch
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, replace: bool = False):
    """Yield a temporary sibling directory that becomes out_dir only when the block succeeds.

    replace=False: out_dir must not exist or be empty (exports). replace=True: an existing out_dir
    is swapped out only once the new one is complete (the best model, rewritten during training).
    """
    out = Path(out_dir)
    if not replace and out.exists() and any(out.iterdir()):
        raise LlamaforgeError(f"{out}: exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)   # mkdtemp makes it owner-only; the result should be like any new directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

"""The GGUF header: metadata key/values and tensor descriptions, parsed straight from a memory map.

Kept apart from `gguf.py` (weights, dequantisation, writing) and free of torch: reading a file's
metadata alone (`llamaforge openness`) costs about a millisecond whatever the file's size.
"""
from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

import numpy as np

from ..errors import LlamaforgeError

# GGUF metadata value types.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Parser:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise LlamaforgeError(f"{self.path}: truncated GGUF header (ends at byte {len(self.buf)})")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise LlamaforgeError(f"{self.path}: truncated GGUF header (ends at byte {len(self.buf)})")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == 6:
            # The shortest decimal that rounds to this float32: 1e-05, not 9.999999747378752e-06.
            return float(str(np.float32(self.unpack("<f"))))
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                end = self.pos + count * dt.itemsize
                if end > len(self.buf):
                    raise LlamaforgeError(f"{self.path}: truncated GGUF header (ends at byte {len(self.buf)})")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos = end
                return arr.astype(bool).tolist() if etype == 7 else arr.tolist()
            return [self.value(etype) for _ in range(count)]
        raise LlamaforgeError(f"{self.path}: unknown GGUF metadata value type {vtype} at byte {self.pos}")


def read_gguf(path: Path):
    """(metadata dict, {name: (numpy shape, ggml type, byte offset, nbytes)}, mmap buffer)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise LlamaforgeError(f"{path}: empty file") from None
    p = _Parser(buf, path)
    if bytes(buf[:4]) != b"GGUF":
        raise LlamaforgeError(f"{path}: not a GGUF file (bad magic)")
    p.pos = 4
    version = p.unpack("<I")
    if version not in (2, 3):
        raise LlamaforgeError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = p.unpack("<Q"), p.unpack("<Q")
    meta = {}
    for _ in range(n_kv):
        key = p.string()
        meta[key] = p.value(p.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = p.string()
        dims = [p.unpack("<Q") for _ in range(p.unpack("<I"))]
        ttype, offset = p.unpack("<I"), p.unpack("<Q")
        infos.append((name, dims, ttype, offset))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0:
        raise LlamaforgeError(f"{path}: invalid general.alignment {align!r}")
    data_start = (p.pos + align - 1) // align * align
    tensors = {}
    for name, dims, ttype, offset in infos:
        try:
            qtype = GGMLQuantizationType(ttype)
        except ValueError:
            raise LlamaforgeError(f"{path}: tensor {name} has unknown GGML type {ttype}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if not dims or dims[0] % block:
            raise LlamaforgeError(f"{path}: tensor {name}: rows of {dims[0] if dims else 0} values do not fit "
                                  f"{qtype.name} blocks of {block}")
        n = math.prod(dims)
        nbytes = n // block * type_size
        start = data_start + offset
        if start + nbytes > len(buf):
            raise LlamaforgeError(f"{path}: truncated: tensor {name} needs bytes up to {start + nbytes}, "
                                  f"file has {len(buf)}")
        tensors[name] = (tuple(reversed(dims)), qtype, start, nbytes)
    return meta, tensors, buf



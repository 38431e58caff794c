"""Weight-only int8 and int4 for fast CPU decoding.

Batch-1 decoding reads every weight once per token, so its speed is set by bytes moved: int8
weights move half the bytes of bf16, int4 a quarter. int8 keeps one bf16 scale per output row
(symmetric); int4 keeps a scale and an offset per group of 32 inputs, the layout of llama.cpp's
Q4_1 blocks, so a Q4_1 checkpoint converts without further loss (each block's min and max are
two of its 16 levels). Decode steps (a few rows of activations) use PyTorch's weight-only
kernels, or where the CPU has AMX tiles llamaforge's (`kernels.int4_mm_amx`, and
`kernels.int8_mm_amx` for the output projection); long inputs (prefill) dequantise to bf16 and
use the dense matmul, faster there (on AMX tiles, `kernels.int4_dense_mm_amx`, which dequantises
block by block as it multiplies).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LlamaforgeError
from .device import cpu_flags_have
from .kernels import (
    amx_available,
    gemv_extension,
    gemv_int8,
    int4_dense_mm_amx,
    int4_mm_amx,
    int4pack_to_bf16_t,
    int8_mm_amx,
    int8_tiles,
)

# Up to this many activation rows the int8 kernel beats dequantise + dense (measured on a 2-core
# AVX-512 CPU: 1 row 53 us vs 93 us for a 1536x576 weight; 512 rows 7.4 ms vs 2.4 ms).
INT8_KERNEL_MAX_ROWS = 16
# From this many rows an Int4Linear multiplies densely, from its kept copy or from its weights
# unpacked (see Int4Linear.forward): a prefill chunk, not a server's decode step (at most
# --max-batch rows). Unpacking pays from 64 rows (120 layers: 60 against 90 ms on an AMX Xeon,
# about even on AMD by the rates in forward's comment). Measured in the model,
# where every weight comes from memory, the int4 kernel wins up to 16 rows at least (a 16-row step
# reads a quarter of the bytes): 16 clients of bench_serve 165 / 183 -> 199 / 234 tokens/s with
# this at 8 -> 64, in alternation. A matrix alone, in cache, had suggested 8.
DENSE_MIN_ROWS = 64
# Where the CPU has AMX tiles, int4 inputs of fewer rows than this take the decode kernel
# (`int4_mm_amx`), others the dense one (`int4_dense_mm_amx`). SmolLM2's 120 layers on a 2-core AMX
# Xeon, weights from memory, decode kernel / dense kernel: 16 rows 4.9 / 8.2 ms, 32 rows 7.6 / 9.2,
# 48 rows 11.4 / 10.4, 64 rows 15.3 / 11.2, 128 rows 27.2 / 17.0 (one run of 30 layers' shapes,
# 2026-12-03). A decode step (one position a row) takes the decode kernel whatever its rows (see
# Int4Linear.forward).
AMX_MAX_ROWS = 48


def int8_rows(weight: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scales fp32 (N,)): symmetric per output row, w ~ q * scale."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, dtype=torch.float32, device=weight.device)
    # A few thousand rows at a time: the fp32 temporaries of a 49k-row output projection
    # would otherwise add hundreds of MB to peak memory.
    for i in range(0, n, chunk_rows):
        w = weight[i:i + chunk_rows].detach().float()
        s = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q[i:i + chunk_rows] = (w / s[:, None]).round_().clamp_(-128, 127).to(torch.int8)
        scales[i:i + chunk_rows] = s
    return q, scales


def int4_groups(weight: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 (N, K) in 0..15, scale fp32 (N, K/G), lo fp32 (N, K/G)): asymmetric per group of
    `group_size` inputs, w ~ q * scale + lo (each group's min and max are two of its 16 levels)."""
    n, k = weight.shape
    if k % group_size:
        raise LlamaforgeError(f"int4 needs every linear layer's input width to be a multiple of {group_size}, and one "
                              f"is {k}: use int8")
    w = weight.detach().float().view(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)                                   # (N, K/G)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((w - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).view(n, k).to(torch.uint8)
    return q, scale, lo


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, chunk_rows: int = 4096,
                 tiles: bool = False):
        super().__init__()
        n, k = weight.shape
        q, scales = int8_rows(weight, chunk_rows)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features = k, n
        # tiles (the output projection's): where the CPU has AMX tiles, every product takes
        # int8_mm_amx, which sums exactly (int32 tiles over three int8 digits of each activation):
        # SmolLM2's at 16 rows 1.5 against 5.5 ms (gemv_int8), at 1 row 0.6-0.8 against 0.7, and a
        # row's logits the same in any batch. It reads a second copy, in the tiles' layout (+28
        # MB): not for --quantize int8's layers, whose bf16 rows PyTorch's int8 kernel takes.
        self.amx = tiles and weight.device.type == "cpu" and n % 16 == 0 and k % 64 == 0 and amx_available()
        self.register_buffer("weight_tiles", int8_tiles(q) if self.amx else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In x's dtype: the model's, or fp32 (the output projection's logits)."""
        if self.amx and x.device.type == "cpu":
            y = int8_mm_amx(self.weight_tiles, self.scales, x)
            y = y if x.dtype == torch.float32 else y.to(x.dtype)
            return y if self.bias is None else y + self.bias
        x2 = x.reshape(-1, self.in_features)
        rows, cpu = x2.shape[0], x.device.type == "cpu"
        if x.dtype == torch.float32 and rows <= 64 and cpu and gemv_extension() is not None:
            # PyTorch's int8 kernel is ~10x slower on fp32 rows than on bf16 ones (11.8 against
            # 1.2 ms for the 49k x 576 output projection on 2 cores); ours takes 1.0, and 6.3 for
            # the 16 rows of a server's decode step (dequantising the weight instead: ~15).
            y = gemv_int8(self.weight, self.scales, x2)
        elif rows <= INT8_KERNEL_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float32) and cpu:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales.to(x.dtype))
        else:
            y = F.linear(x2, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def int4_values_t(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """W^T (K, N) fp32 of int4 values q (N, K) with PyTorch's (K/G, N, 2) scales and zeros:
    (q - 8) * s + z, a product and a sum, as the unpacking kernel computes them."""
    n, k = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)                                   # (N, K/G, 2)
    return ((q.view(n, sz.shape[1], -1) - 8) * sz[..., :1] + sz[..., 1:]).view(n, k).t().contiguous()


_int4_unpacking: bool | None = None


def int4_unpacking_available() -> bool:
    """Whether long int4 inputs may be unpacked for a dense matmul here: the kernel builds, the CPU
    multiplies bf16 in hardware (AVX512-BF16 or AMX; elsewhere the dense bf16 product is emulated
    and unmeasured), and PyTorch packs as the kernel reads (blocks of 64 rows, its AVX-512 path;
    its AVX2 and default paths use 32): checked once on a small matrix, not assumed."""
    global _int4_unpacking
    if _int4_unpacking is None:
        _int4_unpacking = False
        if cpu_flags_have("avx512_bf16") and gemv_extension() is not None:
            g = torch.Generator().manual_seed(0)
            q = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.int32)
            sz = torch.rand(2, 128, 2, generator=g).bfloat16()
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            _int4_unpacking = packed.shape == (128, 32) and torch.equal(
                int4pack_to_bf16_t(packed, sz, 32), int4_values_t(q, sz).bfloat16())
    return _int4_unpacking


class Int4Linear(nn.Module):
    """Weight-only int4, asymmetric per group of `group_size` inputs: w = (q - 8) * scale + zero."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, group_size: int = 32,
                 keep_dense: bool = False):
        super().__init__()
        n, k = weight.shape
        q, scale, lo = int4_groups(weight, group_size)
        q = q.to(torch.int32)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # (K/G, N, 2): per group, the scale and the value that q = 8 stands for.
        self.register_buffer("scales_and_zeros", torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1)
                             .contiguous().to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features, self.group_size = k, n, group_size
        # Long inputs can be multiplied densely from unpacked weights (see forward) where the
        # unpacking kernel builds and knows the packing (blocks of 64 output rows).
        self.unpacks = n % 64 == 0 and group_size % 16 == 0 and dtype == torch.bfloat16 and weight.device.type == "cpu" \
            and int4_unpacking_available()
        # The AMX kernels read the same packing (and groups of 32): int4_mm_amx below AMX_MAX_ROWS
        # rows, int4_dense_mm_amx from there.
        self.amx = self.unpacks and group_size == 32 and amx_available()
        self.dense_min_rows = AMX_MAX_ROWS if self.amx else DENSE_MIN_ROWS
        # A server's copy in the model dtype, for inputs of many rows (see forward): the int4
        # values themselves, transposed (K, N) as the unpacking kernel writes them, so that a
        # prefill computes the same from either. Not on AMX tiles, whose kernel dequantises as it
        # multiplies, without the copy (-212 MB for SmolLM2): faster than oneDNN with the copy up to
        # ~300 rows, about even at 512 (bench_gemv.py --int4: 128 rows 18.8 / 29.2 ms, 256 rows
        # 35.5 / 70.9, 512 rows 63.8 / 59.9).
        dense = None
        if keep_dense and not self.amx:
            dense = int4_values_t(q, self.scales_and_zeros).to(dtype)
        self.register_buffer("dense_t", dense, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Few rows (decode steps): our AMX kernel where the CPU has tiles, else PyTorch's int4
        # kernel. Many rows (a prefill): on AMX tiles our dense kernel (int4_dense_mm_amx), else
        # the dense bf16 matmul, which computes at ~870 GFLOP/s on 2 AVX-512 BF16 cores, where
        # PyTorch's int4 kernel reaches ~170-300: from a server's kept copy, or from this layer's
        # weights unpacked for the call (the same values). SmolLM2's 120 layers at 256 rows on a
        # 2-core AMX Xeon (benchmarks/bench_gemv.py --int4): int4 kernel 351 ms, unpacked 87, kept
        # copy 63 (2026-11; 70.9 on 2026-12-03, when int4_dense_mm_amx took 35.5).
        rows = x.numel() // self.in_features
        # A decode step (one position a row) takes the decode kernel whatever its rows, so that a
        # server's step of any --max-batch computes each row as it would alone.
        decoding = x.dim() > 2 and x.shape[-2] == 1
        if self.amx and (rows < self.dense_min_rows or decoding):   # shapes kept by the kernel: few Python ops a call
            y = int4_mm_amx(x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16), self.weight, self.scales_and_zeros)
            y = y if x.dtype == torch.bfloat16 else y.to(x.dtype)
            return y if self.bias is None else y + self.bias
        x2 = x.reshape(rows, self.in_features)
        # Traced by torch.compile (no custom op wraps the dense kernel): unpacked and oneDNN's product,
        # the same values to bf16 rounding.
        if self.amx and not torch.compiler.is_compiling():
            y = int4_dense_mm_amx(x2.to(torch.bfloat16), self.weight, self.scales_and_zeros)
        elif rows >= self.dense_min_rows and (self.dense_t is not None or self.unpacks):
            wt = self.dense_t if self.dense_t is not None else \
                int4pack_to_bf16_t(self.weight, self.scales_and_zeros, self.group_size)      # (K, N)
            y = x2.to(wt.dtype) @ wt
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.weight,
                                                           self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def quantize_weights(model: nn.Module, bits: int = 8, keep_dense: bool = False) -> nn.Module:
    """Replace every linear layer of the transformer by Int8Linear or Int4Linear, and the output
    projection by Int8Linear (it decides every token; 4 bits there cost the most quality).
    The token embedding stays in the model dtype (a lookup reads only the rows it needs)."""
    dtype = model.embed_tokens.weight.dtype
    if bits == 4:
        model.replace_linears(lambda linear: Int4Linear(linear.weight, linear.bias, dtype, keep_dense=keep_dense))
    else:
        model.replace_linears(lambda linear: Int8Linear(linear.weight, linear.bias, dtype))
    # fp32 scales: the logits are computed in fp32 (`Llama.logits`).
    model.lm_head = Int8Linear(model.output_weight, None, torch.float32, tiles=True)
    return model


def prefill_rows_alone(model: nn.Module) -> int | None:
    """The fewest rows of a prefill from which every matrix product of an inference model computes
    each row as it would alone, whatever rows come with it: int4 layers on AMX tiles (their dense
    kernel, from dense_min_rows up; fewer rows take the decode kernel, which rounds otherwise) and
    an int8 output projection on tiles. Then prompts may share a pass and get the numbers they get
    alone. None where some product's rounding depends on its shape (oneDNN's and PyTorch's kernels
    pick their blocking by it)."""
    head = model.lm_head
    products = [m for m in model.layers.modules() if hasattr(m, "out_features") and hasattr(m, "weight")]
    if not (isinstance(head, Int8Linear) and head.amx and products
            and all(isinstance(m, Int4Linear) and m.amx for m in products)):
        return None
    return max(m.dense_min_rows for m in products)


# --- QLoRA: frozen quantised weights that gradients flow through -----------------------------------

class FrozenQuantizedLinear(nn.Module):
    """A frozen linear layer held in int8 (per-row scales) or int4 (groups of 32, two values a
    byte) for training adapters over it (QLoRA): the weight is dequantised to the activations'
    dtype just for its matrix product, in the forward pass and again in the backward pass, so no
    more than one layer's full-precision weight exists at a time. Gradients reach the input (and
    the adapters before it); the weight gets none.

    The quantisation is the inference formats' (`Int8Linear`, `Int4Linear`), in a layout of plain
    tensors that dequantises with ordinary operations on any device."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int = 32):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        n, k = weight.shape
        self.in_features, self.out_features, self.bits, self.group_size = k, n, bits, group_size
        if bits == 8:
            q, scales = int8_rows(weight)
            self.register_buffer("weight", q)
            self.register_buffer("scales", scales.to(torch.bfloat16))
            self.lo = None
        else:
            q, scale, lo = int4_groups(weight, group_size)
            self.register_buffer("weight", q[:, 0::2] | (q[:, 1::2] << 4))    # (N, K/2): even inputs low
            self.register_buffer("scales", scale.to(torch.bfloat16))          # (N, K/G)
            self.register_buffer("lo", lo.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype, chunk_rows: int = 512) -> torch.Tensor:
        """The weight (N, K) in `dtype`. int4 unpacks each byte's two values through a 256-entry
        table, a few hundred rows at a time (their temporaries stay in cache): 124 ms for an
        11008 x 4096 weight on 2 AVX-512 cores, against 185 ms as whole-tensor operations."""
        if self.bits == 8:
            return self.weight.to(dtype) * self.scales.to(dtype)[:, None]
        n, k, g = self.out_features, self.in_features, self.group_size
        byte = torch.arange(256, device=self.weight.device)
        table = torch.stack([byte & 15, byte >> 4], dim=-1).to(dtype)                   # (256, 2)
        out = torch.empty(n, k, dtype=dtype, device=self.weight.device)
        scales, lo = self.scales.to(dtype), self.lo.to(dtype)
        for i in range(0, n, chunk_rows):
            q = F.embedding(self.weight[i:i + chunk_rows].int(), table).view(-1, k // g, g)
            torch.addcmul(lo[i:i + chunk_rows, :, None], q, scales[i:i + chunk_rows, :, None],
                          out=out[i:i + chunk_rows].view(-1, k // g, g))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantizedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}"


class _DequantizedMatmul(torch.autograd.Function):
    """x W^T with W dequantised on the fly; the backward pass dequantises W again rather than
    keeping it (autograd would keep every layer's full-precision weight until the backward pass)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantized(grad.dtype), None

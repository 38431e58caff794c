"""Parameter-efficient adapters: LoRA layers, attached to a Llama's linear layers, trained, merged,
and saved / loaded in PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`) so that
`peft.PeftModel.from_pretrained` reads what we write, and we read what it writes.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LlamaforgeError
from ..files import read_json, write_json
from .llama import KVCache
from .quantize import FrozenQuantizedLinear

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdaLoRASchedule:
    """How AdaLoRA moves its rank budget (PEFT's AdaLoraConfig, whose field names the saved
    adapter_config.json uses): every adapted matrix starts at the initial rank; after `tinit` steps
    the total budget falls on a cubic curve to target_rank per matrix, reached `tfinal` steps before
    the end; every `delta_t` steps the least important singular triplets are masked.
    train/adalora.py runs it."""
    target_rank: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85             # sensitivity smoothing
    beta2: float = 0.85             # uncertainty smoothing
    orth_reg_weight: float = 0.5    # keeps A's rows and B's columns near orthonormal
    total_step: int | None = None   # the run's steps, once the trainer knows them


@dataclass
class LoRAConfig:
    rank: int = 16                  # AdaLoRA: the initial rank
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(ALL_LINEARS))
    adalora: AdaLoRASchedule | None = None   # set: AdaLoRA layers (SVD form, a moving rank budget)

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(ALL_LINEARS))
        if unknown:
            raise LlamaforgeError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(ALL_LINEARS)}")
        if self.rank < 1:
            raise LlamaforgeError(f"LoRA rank must be at least 1, got {self.rank}")
        if self.adalora is not None and not 0 < self.adalora.target_rank <= self.rank:
            raise LlamaforgeError(f"AdaLoRA's target rank must be between 1 and the initial rank ({self.rank}), "
                                  f"got {self.adalora.target_rank}")

    @property
    def scaling(self) -> float:
        """What the update B A x is multiplied by: alpha / rank (AdaLoRA: / (initial rank + 1e-5),
        PEFT's, for the whole run however many triplets it keeps)."""
        return self.alpha / (self.rank + 1e-5) if self.adalora is not None else self.alpha / self.rank


class _LoRAProduct(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T for training, W and b frozen, with a backward of its own:
    d x = d y W + (s d y B) A accumulates into one matrix product's output (C += A B), where
    autograd adds the two products' results in a pass of its own, and the scaling rides on the
    rank-wide tensors. An SST-2 LoRA step of 16 x 24 tokens on AVX-512 spent ~4% of its time in
    those sums, the scaling's multiplications and the out-of-place add's copy."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ down.t()                                          # (N, rank)
        y = F.linear(x2, weight, bias).addmm_(h, up.t(), alpha=scaling)
        ctx.save_for_backward(x2, h, weight, down, up)
        ctx.scaling, ctx.shape = scaling, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, h, weight, down, up = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_x, _, _, need_down, need_up, _ = ctx.needs_input_grad
        dh = (dy2 @ up).mul_(ctx.scaling) if need_x or need_down else None   # (N, rank)
        dx = (dh @ down).addmm_(dy2, weight).view(ctx.shape) if need_x else None
        d_down = dh.t() @ x2 if need_down else None
        d_up = (dy2.t() @ h).mul_(ctx.scaling) if need_up else None
        return dx, None, None, d_down, d_up, None


class LoRALinear(nn.Module):
    """y = x W^T + b + (dropout(x) A^T B^T) * alpha / rank, with W, b frozen.

    W and b are the original layer's own tensors under the same names, so the model's state dict
    keeps its keys and `merge` is one in-place add. B starts at zero: the adapted model begins as
    the base model exactly.
    """

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # as nn.Linear and PEFT initialise
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.disabled = False   # see adapters_disabled
        self.quantized: FrozenQuantizedLinear | None = None   # QLoRA: W and b live here instead

    def down(self) -> torch.Tensor:
        """The (rank, in) matrix that x meets first."""
        return self.lora_A

    def quantize_base(self, bits: int):
        """Hold W and b in int8 or int4 (QLoRA); the adapter trains as before."""
        self.quantized = FrozenQuantizedLinear(self.weight, self.bias, bits)
        del self.weight
        self.bias = None

    def base_weight(self) -> torch.Tensor:
        """W as it computes: the dequantised values over a quantised base."""
        return self.weight if self.quantized is None else self.quantized.dequantized(self.lora_A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.disabled and self.quantized is None and isinstance(self.dropout, nn.Identity)
                and torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            return _LoRAProduct.apply(x, self.weight, self.bias, self.down(), self.lora_B, self.scaling)
        y = F.linear(x, self.weight, self.bias) if self.quantized is None else self.quantized(x)   # (..., out)
        if self.disabled:
            return y
        h = F.linear(self.dropout(x), self.down()) * self.scaling          # (..., rank): scale the small tensor
        # y += h B^T inside the matrix product (beta=1), not as a separate pass over y. In place
        # where nothing needs a gradient; where something does (training with dropout, or traced
        # by torch.compile; else _LoRAProduct) out of place, as autograd's backward of an in-place
        # op on a view copies the gradient twice (CopySlices).
        y2, h2 = y.view(-1, self.out_features), h.reshape(-1, h.shape[-1])
        if torch.is_grad_enabled() and (y.requires_grad or h.requires_grad):
            return torch.addmm(y2, h2, self.lora_B.t()).view(y.shape)
        y2.addmm_(h2, self.lora_B.t())
        return y

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the update folded in (W + B A * scaling), computed in fp32 (over
        a quantised base: onto its dequantised W)."""
        weight, bias = self.base_weight().detach(), self.bias if self.quantized is None else self.quantized.bias
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                        device=weight.device, dtype=weight.dtype)
        delta = (self.lora_B.detach().float() @ self.down().detach().float()) * self.scaling
        lin.weight = nn.Parameter((weight.float() + delta).to(weight.dtype), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
        return lin


class AdaLoRALinear(LoRALinear):
    """AdaLoRA (Zhang et al. 2023), PEFT's SVDLinear: the update is B diag(E) A, an SVD-like form
    whose singular triplets (a row of A, a value of E, a column of B) the rank allocator masks by
    importance (E's value set to zero), so the rank budget moves to the matrices that need it.
    A and B start random (normal, std 0.02), E at zero; the scaling is alpha / initial rank for
    the whole run, pruned or not. `kept` marks the triplets the allocator keeps (all, until it masks)."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__(base, cfg)
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        self.lora_E = nn.Parameter(torch.zeros(cfg.rank, 1, device=self.lora_A.device, dtype=self.lora_A.dtype))
        self.schedule = cfg.adalora   # one object, shared by every layer of a model
        self.register_buffer("kept", torch.ones(cfg.rank, dtype=torch.bool, device=self.lora_A.device), persistent=False)

    def down(self) -> torch.Tensor:
        return self.lora_A * self.lora_E


def add_lora(llama: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze the Llama and put LoRA layers (AdaLoRA's with cfg.adalora) on its target linears;
    returns it."""
    for p in llama.parameters():
        p.requires_grad_(False)
    kind = AdaLoRALinear if cfg.adalora is not None else LoRALinear
    llama.replace_linears(lambda lin: kind(lin, cfg), names=set(cfg.targets))
    return llama


QUANTIZE_BASE = {"int8": 8, "int4": 4}


def quantize_frozen_base(llama: nn.Module, kind: str) -> nn.Module:
    """QLoRA: every frozen linear layer of the blocks (LoRA layers' W and b, and untargeted
    linears) held in int8 or int4 (`kind`); embeddings, norms, the output projection, adapters
    and heads stay as they are. Call after add_lora."""
    bits = QUANTIZE_BASE[kind]
    for m in llama.modules():
        if isinstance(m, LoRALinear) and m.quantized is None:
            m.quantize_base(bits)
    return llama.replace_linears(lambda lin: FrozenQuantizedLinear(lin.weight, lin.bias, bits))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model, for as long as the context lasts: every LoRA layer computes W x + b alone
    (DPO's reference model, with no second copy of the weights)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def merge_lora(llama: nn.Module) -> nn.Module:
    """Fold every LoRA layer into a plain linear layer (for inference and export)."""
    return llama.replace_linears(LoRALinear.merged, kind=LoRALinear)


# --- several adapters on one model, for serving ----------------------------------------------------

class AdapterRows:
    """Which adapter each row of the next batch uses (0: none), shared by every MultiLoRALinear of
    a model: a server sets it once per forward."""

    def __init__(self):
        self.rows: torch.Tensor | None = None


class MultiLoRALinear(nn.Module):
    """A frozen inference layer (dense, int4, int8 or kernel-backed) with any number of LoRA
    adapters beside it: the base runs once for the whole batch, then each adapter adds its update
    to the rows that use it (vLLM's and LoRAX's multi-LoRA serving). Ten adapters of one base cost
    ten adapters of memory, not ten models. A stacked q/k/v or gate/up layer holds each target's
    update as a slice of its output: `deltas[adapter] = [(A, B, scaling, start, end), ...]`."""

    def __init__(self, base: nn.Module, rows: AdapterRows):
        super().__init__()
        self.base, self.rows_of = base, rows
        self.deltas: dict[int, list[tuple[torch.Tensor, torch.Tensor, float, int, int]]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.rows_of.rows
        if rows is None or not self.deltas:
            return y
        for adapter, parts in self.deltas.items():
            idx = (rows == adapter).nonzero().flatten()
            if idx.numel() == 0:
                continue
            xs = x[idx].to(parts[0][0].dtype)
            for a, b, scaling, start, end in parts:
                y[idx, ..., start:end] += ((xs @ a.t()) @ b.t() * scaling).to(y.dtype)
        return y


def add_served_adapter(llama: nn.Module, adapter_dir: str | Path, index: int, rows: AdapterRows):
    """Attach the PEFT LoRA (or AdaLoRA) adapter in `adapter_dir` to an inference model (stacked
    projections and quantised or kernel-backed layers welcome) as adapter number `index` (>= 1)."""
    path, updates, scaling = lora_updates(adapter_dir)
    dtype, c = llama.embed_tokens.weight.dtype, llama.config
    q, kv, ff = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.intermediate_size
    width = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": c.dim, "gate_proj": ff, "up_proj": ff, "down_proj": c.dim}
    for i, block in enumerate(llama.layers):
        attn, mlp = block.self_attn, block.mlp
        # Where each target's output lies: (module, its attribute, first output column).
        places = {"o_proj": (attn, "o_proj", 0), "down_proj": (mlp, "down_proj", 0)}
        if attn.qkv_proj is not None:
            places.update(q_proj=(attn, "qkv_proj", 0), k_proj=(attn, "qkv_proj", q), v_proj=(attn, "qkv_proj", q + kv))
        else:
            places.update({n: (attn, n, 0) for n in ("q_proj", "k_proj", "v_proj")})
        if mlp.gate_up_proj is not None:
            places.update(gate_proj=(mlp, "gate_up_proj", 0), up_proj=(mlp, "gate_up_proj", ff))
        else:
            places.update({n: (mlp, n, 0) for n in ("gate_proj", "up_proj")})
        for name, (parent, attr, start) in places.items():
            key = f"layers.{i}.{'self_attn' if parent is attn else 'mlp'}.{name}"
            if key not in updates:
                continue
            a, b = (t.to(dtype) for t in updates[key])
            if b.shape != (width[name], a.shape[0]):
                raise LlamaforgeError(f"{path}: {key} does not fit the base model")
            holder = getattr(parent, attr)
            if not isinstance(holder, MultiLoRALinear):
                holder = MultiLoRALinear(holder, rows)
                setattr(parent, attr, holder)
            holder.deltas.setdefault(index, []).append((a, b, scaling, start, start + width[name]))
    return llama


# --- PEFT layout ---------------------------------------------------------------------------------
# PEFT wraps the HF model as `base_model.model.<HF name>`; LoRA tensors are `<module>.lora_A.weight`,
# and a fully trained module (`modules_to_save`, e.g. a classification head) is saved whole.
PEFT_PREFIX = "base_model.model."


def save_peft_adapter(model: nn.Module, out_dir: str | Path, cfg: LoRAConfig, task_type: str,
                      modules_to_save: list[str] = (), base_model: str | None = None, hf_prefix: str = ""):
    """Write adapter_config.json + adapter_model.safetensors into out_dir (which must exist).

    model: a module whose parameter names, after `hf_prefix`, are HF's: LlamaForClassification
    as it is, a Llama with hf_prefix="model." (LlamaForCausalLM's names)."""
    from safetensors.torch import save_file

    state, rank_pattern = {}, {}
    for name, p in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")) and cfg.adalora is None:
            state[PEFT_PREFIX + hf_prefix + name + ".weight"] = p.detach().contiguous()
        elif name.endswith((".lora_A", ".lora_B", ".lora_E")):
            # AdaLoRA, as PEFT saves it: no ".weight", only the triplets kept (their pattern in
            # the config), by the names of the module's HF model.
            module = name.rsplit(".", 1)[0]
            kept = model.get_submodule(module).kept
            rank_pattern[hf_prefix + module + ".lora_E"] = kept.tolist()
            t = p.detach()[:, kept] if name.endswith(".lora_B") else p.detach()[kept]
            state[PEFT_PREFIX + hf_prefix + name] = t.contiguous()
        elif name.split(".")[0] in modules_to_save:
            state[PEFT_PREFIX + hf_prefix + name] = p.detach().contiguous()
    save_file(state, str(Path(out_dir) / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.targets), "modules_to_save": list(modules_to_save) or None,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False,
    }
    if cfg.adalora is not None:   # the schedule the layers trained with (the trainer fills in its steps)
        a = next((m.schedule for m in model.modules() if isinstance(m, AdaLoRALinear)), cfg.adalora)
        # r: LoraConfig's default (AdaLoRA ignores it; PEFT warns about any other value).
        config.update(peft_type="ADALORA", r=8, init_r=cfg.rank, target_r=a.target_rank, tinit=a.tinit,
                      tfinal=a.tfinal, deltaT=a.delta_t, beta1=a.beta1, beta2=a.beta2, orth_reg_weight=a.orth_reg_weight,
                      total_step=a.total_step, rank_pattern=rank_pattern if not all(all(k) for k in rank_pattern.values())
                      else None)
    write_json(Path(out_dir) / "adapter_config.json", config)
    bits = {m.quantized.bits for m in model.modules() if isinstance(m, LoRALinear) and m.quantized is not None}
    if bits:   # QLoRA: what the adapter was trained over, for merging onto the same values
        write_json(Path(out_dir) / QUANTIZED_BASE_FILE, {"quantize_base": f"int{bits.pop()}", "group_size": 32})


# A QLoRA adapter's note of the base it was trained over (PEFT ignores files it does not know).
QUANTIZED_BASE_FILE = "quantized_base.json"


def quantized_base_of(adapter_dir: str | Path) -> str | None:
    """"int8" or "int4" for an adapter trained over a quantised base (QLoRA), else None."""
    path = Path(adapter_dir) / QUANTIZED_BASE_FILE
    if not path.exists():
        return None
    kind = read_json(path).get("quantize_base")
    if kind not in QUANTIZE_BASE:
        raise LlamaforgeError(f"{path}: quantize_base must be {' or '.join(QUANTIZE_BASE)}, not {kind!r}")
    return kind


def read_peft_config(adapter_dir: str | Path) -> LoRAConfig:
    """The LoRAConfig of a PEFT LoRA or AdaLoRA adapter (AdaLoRA: rank is its initial rank)."""
    path = Path(adapter_dir) / "adapter_config.json"
    raw = read_json(path)
    if raw.get("peft_type") == "ADALORA":
        if not isinstance(raw.get("target_r"), int) or not isinstance(raw.get("init_r"), int):
            raise LlamaforgeError(f"{path}: an ADALORA adapter needs init_r and target_r (integers)")
        raw = {**raw, "r": raw.get("init_r")}
        adalora = AdaLoRASchedule(target_rank=raw.get("target_r"), tinit=raw.get("tinit") or 0,
                                  tfinal=raw.get("tfinal") or 0, delta_t=raw.get("deltaT") or 1,
                                  orth_reg_weight=raw.get("orth_reg_weight", 0.5), total_step=raw.get("total_step"))
    elif raw.get("peft_type") == "LORA":
        adalora = None
    else:
        raise LlamaforgeError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (LORA and ADALORA are)")
    if raw.get("use_dora") or raw.get("use_rslora"):
        raise LlamaforgeError(f"{path}: DoRA and rsLoRA adapters are not supported")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):
        raise LlamaforgeError(f"{path}: target_modules as a regular expression is not supported; list the names")
    rank, alpha, dropout = raw.get("r"), raw.get("lora_alpha"), raw.get("lora_dropout") or 0.0
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or not isinstance(dropout, (int, float)):
        raise LlamaforgeError(f"{path}: needs r (a positive integer), lora_alpha and lora_dropout (numbers); "
                              f"found r={rank!r}, lora_alpha={alpha!r}, lora_dropout={dropout!r}")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise LlamaforgeError(f"{path}: target_modules must be a list of module names, not {targets!r}")
    return LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=[t.split(".")[-1] for t in targets],
                      adalora=adalora)


def rank_pattern_of(adapter_dir: str | Path) -> dict[str, list[bool]]:
    """An AdaLoRA adapter's kept triplets by module (HF name + ".lora_E"); {} when none was masked."""
    return read_json(Path(adapter_dir) / "adapter_config.json").get("rank_pattern") or {}


def _read_adapter_tensors(adapter_dir: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.exists():
        raise LlamaforgeError(f"{path}: missing")
    return path, load_file(str(path))


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path, hf_prefix: str = ""):
    """Load adapter weights written by `save_peft_adapter` (or by PEFT) into a model that already
    has its LoRA layers (`add_lora`) and head."""
    path, tensors = _read_adapter_tensors(adapter_dir)
    params = dict(model.named_parameters())
    pattern = rank_pattern_of(adapter_dir)
    for key, t in tensors.items():
        key = key.removeprefix(PEFT_PREFIX).removeprefix(hf_prefix)
        name = key.removesuffix(".weight") if ".lora_" in key else key
        if name not in params:
            raise LlamaforgeError(f"{path}: tensor {key} matches no parameter of the model")
        module = name.rsplit(".", 1)[0]
        kept = pattern.get(hf_prefix + module + ".lora_E")
        if kept is not None and name.endswith((".lora_A", ".lora_B", ".lora_E")):
            # AdaLoRA keeps only the triplets it kept; the others stay masked (E = 0).
            layer = model.get_submodule(module)
            layer.kept.copy_(torch.tensor(kept))
            full = torch.zeros_like(params[name])
            if name.endswith(".lora_B"):
                full[:, layer.kept] = t.to(full.dtype)
            else:
                full[layer.kept] = t.to(full.dtype)
            t = full
        if params[name].shape != t.shape:
            raise LlamaforgeError(f"{path}: tensor {key} has shape {tuple(t.shape)}, expected {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(t)


def saved_modules(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The modules a PEFT adapter saves whole (`modules_to_save`, e.g. a classifier's `score`),
    by their parameter names without PEFT's prefix: {"score.weight": ...}."""
    _, tensors = _read_adapter_tensors(adapter_dir)
    return {k.removeprefix(PEFT_PREFIX): t for k, t in tensors.items() if ".lora_" not in k}


def lora_updates(adapter_dir: str | Path) -> tuple[Path, dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """(the tensors' file, {module's name in Llama's names: (down (r, in), up (out, r))}, scaling) of
    a PEFT LoRA or AdaLoRA adapter of a causal LM or a classifier (both keep the Llama under
    `model.`): each module's update is up @ down * scaling. AdaLoRA's down is A's rows scaled by
    E's values (scaling: LoRAConfig.scaling)."""
    cfg = read_peft_config(adapter_dir)
    raw = read_json(Path(adapter_dir) / "adapter_config.json")
    adaptive = cfg.adalora is not None
    extra = [k for k in ("rank_pattern", "alpha_pattern") if raw.get(k) and not (adaptive and k == "rank_pattern")]
    extra += [f"modules_to_save {m}" for m in raw.get("modules_to_save") or [] if m not in ("score", "classifier")]
    if extra:
        raise LlamaforgeError(f"{adapter_dir}/adapter_config.json: {', '.join(extra)} is not supported")
    path, tensors = _read_adapter_tensors(adapter_dir)
    suffix = "" if adaptive else ".weight"
    prefix = PEFT_PREFIX + "model."
    updates = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A" + suffix):
            continue
        b = tensors.get(key.replace(".lora_A", ".lora_B"))
        e = tensors.get(key.replace(".lora_A", ".lora_E")) if adaptive else None
        if b is None or (adaptive and e is None):
            raise LlamaforgeError(f"{path}: tensor {key} has no matching lora_B{' or lora_E' if adaptive else ''}")
        updates[key.removeprefix(prefix).removesuffix(".lora_A" + suffix)] = (a * e if adaptive else a, b)
    return path, updates, cfg.scaling


def merge_lora_into_state(state: dict[str, torch.Tensor], adapter_dir: str | Path):
    """Fold a PEFT LoRA or AdaLoRA adapter (see lora_updates) into a state dict in
    `model.llama.Llama`'s names, in fp32, in place. Heads saved whole (`modules_to_save`) are not
    part of the language model and are left out. An adapter trained over a quantised base (QLoRA,
    `quantized_base.json`) goes onto that base's dequantised weights."""
    path, updates, scaling = lora_updates(adapter_dir)
    quantized = quantized_base_of(adapter_dir)
    if quantized:
        # QLoRA: the update was learned over the quantised weights, so it goes onto those (every
        # linear of the blocks was held quantised, adapted or not).
        for key, w in state.items():
            if key.startswith("layers.") and key.endswith("_proj.weight"):
                state[key] = FrozenQuantizedLinear(w, None, QUANTIZE_BASE[quantized]).dequantized(torch.float32).to(w.dtype)
    for module, (down, up) in updates.items():
        if module + ".weight" not in state:
            raise LlamaforgeError(f"{path}: {module} has no base weight")
        w = state[module + ".weight"]
        state[module + ".weight"] = (w.float() + (up.float() @ down.float()) * scaling).to(w.dtype)


# --- prefix-tuning -------------------------------------------------------------------------------
# Each attention layer gets P learned key/value vectors per KV head, seen by every query before the
# sequence's own keys (Li & Liang 2021). Saved on their own: prefix_config.json + prefix.safetensors.
PREFIX_CONFIG, PREFIX_WEIGHTS = "prefix_config.json", "prefix.safetensors"


@torch.no_grad()
def add_prefix(llama: nn.Module, length: int, init_ids: list[int]) -> nn.Module:
    """Freeze the Llama and give every attention layer a trainable prefix of `length` positions,
    initialised with the keys and values the model itself computes for `init_ids` (real
    activations train far better than random vectors of the wrong scale)."""
    if length < 1:
        raise LlamaforgeError(f"prefix length must be at least 1, got {length}")
    ids = (list(init_ids) * length)[:length]
    for p in llama.parameters():
        p.requires_grad_(False)
    # A plain cache (not a sliding window's ring), whose first `length` slots are the prefix.
    p = llama.embed_tokens.weight
    for layer in llama.layers:
        layer.self_attn.kv_cache = KVCache(1, length, llama.config.n_kv_heads, llama.config.head_dim, p.dtype, p.device)
    llama.hidden_states(torch.tensor([ids], device=p.device), cache_pos=0)
    for layer in llama.layers:
        cache = layer.self_attn.kv_cache
        layer.self_attn.prefix = nn.Parameter(torch.stack([cache.k[0, :, :length], cache.v[0, :, :length]]).clone())
    llama.clear_cache()
    return llama


def prefix_state(llama: nn.Module) -> dict[str, torch.Tensor]:
    return {f"layers.{i}.self_attn.prefix": layer.self_attn.prefix.detach().contiguous()
            for i, layer in enumerate(llama.layers)}


def save_prefix(llama: nn.Module, out_dir: str | Path, base_model: str | None = None):
    from safetensors.torch import save_file
    state = prefix_state(llama)
    save_file(state, str(Path(out_dir) / PREFIX_WEIGHTS), metadata={"format": "pt"})
    length = next(iter(state.values())).shape[2]
    write_json(Path(out_dir) / PREFIX_CONFIG,
               {"adapter_type": "prefix_tuning", "num_virtual_tokens": length, "base_model_name_or_path": base_model,
                "num_layers": len(llama.layers)})


def read_prefix(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    path = Path(adapter_dir) / PREFIX_WEIGHTS
    if not path.exists():
        raise LlamaforgeError(f"{path}: missing")
    return load_file(str(path))


@torch.no_grad()
def load_prefix(llama: nn.Module, tensors: dict[str, torch.Tensor], source: str = "prefix"):
    """Attach saved prefixes (from `read_prefix`) to a Llama of the matching shape."""
    c = llama.config
    for i, layer in enumerate(llama.layers):
        key = f"layers.{i}.self_attn.prefix"
        t = tensors.get(key)
        if t is None or t.dim() != 4 or t.shape[:2] != (2, c.n_kv_heads) or t.shape[3] != c.head_dim:
            raise LlamaforgeError(f"{source}: tensor {key} is missing or does not fit this model "
                                  f"(expected (2, {c.n_kv_heads}, P, {c.head_dim}))")
        w = llama.embed_tokens.weight
        layer.self_attn.prefix = nn.Parameter(t.to(device=w.device, dtype=w.dtype), requires_grad=False)
    return llama


def refuse_prefix(llama: nn.Module, source: str):
    """Training all weights of a prefix-tuned model would train its prefix too, which no HF
    directory can hold: start full training from the base model, or keep tuning the prefix."""
    if any(layer.self_attn.prefix is not None for layer in llama.layers):
        raise LlamaforgeError(f"{source}: a prefix-tuned model; full training and pretraining need a model "
                              f"without a prefix (its base model)")

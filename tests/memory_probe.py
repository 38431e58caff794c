"""Peak memory of training steps, measured in a fresh process: `python memory_probe.py SPEC`
prints {"measured": bytes, "estimate": {...}} as JSON. `measure(spec)` runs it from a test.

SPEC (JSON): model ("default" for SmolLM2, or a preset name for a random model), overrides (of
the preset), dtype (fp32 | bf16), method (full | lora), quantize_base (int8 | int4, with lora),
batch, seq_len, steps, checkpointing.

Measured: the process's peak resident memory (VmHWM) during the training steps, less its resident
memory just before the model was built. The peak is reset once the model exists, so a loader's
own transient copies do not count; what loading leaves resident does. The steps are
trainer.fit's: fp32 masters for bf16 trainable parameters, gradients moved to them, clipping,
fused AdamW, copy back.
"""
from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path


def measure(spec: dict) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
                         capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def resident_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def build(spec: dict):
    import torch

    from llamaforge.model.adapters import LoRAConfig, add_lora
    if spec["model"] == "default":
        from llamaforge.formats.load import load
        model, _ = load("default", dtype=spec["dtype"])
    else:
        from llamaforge.model.config import LlamaConfig
        from llamaforge.model.llama import Llama
        torch.manual_seed(0)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
        model = Llama(LlamaConfig.from_name(spec["model"], **spec.get("overrides", {}))).to(dtype)
    if spec["method"] == "lora":
        add_lora(model, LoRAConfig(rank=16, alpha=32, dropout=0.0))
        if spec.get("quantize_base"):
            from llamaforge.model.adapters import quantize_frozen_base
            quantize_frozen_base(model, spec["quantize_base"])
    else:
        model.requires_grad_(True)
    return model.gradient_checkpointing(spec.get("checkpointing", False)).train()


def train_steps(model, ids, steps: int):
    import torch

    from llamaforge.evaluate.lm import next_token_loss
    from llamaforge.train.trainer import optimizer_groups
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    masters = [(n, p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True))
               for n, p in params]
    low = [(m, p) for (_, m), (_, p) in zip(masters, params, strict=True) if m is not p]
    opt = torch.optim.AdamW(optimizer_groups(masters, 0.01), lr=1e-5, fused=True)
    # AdamW makes its moments at its first step, after that step's backward pass; a zero-gradient
    # step makes them now, so the measured steps are those of a run under way (moments, then
    # activations, then gradients), at a fraction of a step's time.
    for _, m in masters:
        m.grad = torch.zeros_like(m)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for _ in range(steps):
        loss, _ = next_token_loss(model, ids, ids)
        loss.backward()
        del loss
        for m, p in low:
            m.grad, p.grad = p.grad.float(), None
        torch.nn.utils.clip_grad_norm_([m for _, m in masters], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m, p in low:
                p.copy_(m)


def main(spec: dict):
    import torch

    from llamaforge.train.memory import estimate_training_memory
    torch.set_num_threads(2)
    ids = torch.randint(3, 500, (spec["batch"], spec["seq_len"]), generator=torch.Generator().manual_seed(0))
    gc.collect()
    before = resident_kb("VmRSS")
    model = build(spec)
    est = estimate_training_memory(model, micro_batch_size=spec["batch"], seq_len=spec["seq_len"],
                                   gradient_checkpointing=spec.get("checkpointing", False))
    gc.collect()
    built = resident_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM to the resident memory now
        f.write("5")
    train_steps(model, ids, spec.get("steps", 1))
    peak = resident_kb("VmHWM")
    print(json.dumps({"measured": (peak - before) * 1024, "built": (built - before) * 1024,
                      "estimate": vars(est), "summary": est.format()}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(json.loads(sys.argv[1]))

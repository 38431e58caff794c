#!/usr/bin/env bash
# The CUDA path, checked on a machine with a GPU (not part of CI: run it whenever one is at hand,
# and put its figures in the README). Run from the repository root after scripts/setup.sh; torch
# must be a CUDA build there (setup.sh installs the CPU one: pip install torch==2.13.0 from the
# default index gives CUDA on Linux x86_64).
#
#   bash scripts/gpu-check.sh [OUT_DIR]       # default: benchmarks/results/gpu
#
# 1. logits of the default model on CUDA against the CPU in fp32 (max difference), and bf16;
# 2. one SFT (LoRA) and one classification (LoRA) run with --device cuda, and one full
#    fine-tuning run with FSDP2 over every GPU (torchrun) when there are two or more;
# 3. bench_sft.py and bench_classify.py with --device cuda: llamaforge against transformers + peft
#    on the same GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

echo "== 1. logits: CUDA against CPU"
"$PY" - <<'EOF' | tee "$OUT/parity.txt"
import torch
from llamaforge.formats.load import load
prompt = "The llama is a domesticated South American camelid, widely used as a meat and pack animal"
for dtype, bound in (("fp32", 1e-3), ("bf16", None)):
    cpu, tok = load("default", dtype="fp32", quantize="none", device="cpu")
    gpu, _ = load("default", dtype=dtype, quantize="none", device="cuda")
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        a = cpu(ids, fp32_logits=True)
        b = gpu(ids.cuda(), fp32_logits=True).cpu()
    diff = (a - b).abs().max().item()
    same = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"{dtype}: max |logit difference| {diff:.2e}, same argmax at {same:.1%} of positions")
    if bound is not None:
        assert diff < bound, f"CUDA fp32 logits differ from the CPU's by {diff}"
EOF

echo "== 2. training runs on CUDA"
RUNS=$(mktemp -d)
.venv/bin/llamaforge finetune sft --device cuda --train llamaforge/datasets/instructions/train.jsonl \
    --dev llamaforge/datasets/instructions/dev.jsonl --out "$RUNS/sft" --max-steps 60 --samples 1 | tee "$OUT/sft.json"
.venv/bin/llamaforge finetune classify --device cuda --train llamaforge/datasets/sentiment/train.csv \
    --dev llamaforge/datasets/sentiment/dev.csv --test llamaforge/datasets/sentiment/test.csv --out "$RUNS/classify" \
    --epochs 2 | tee "$OUT/classify.txt"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
    .venv/bin/llamaforge finetune sft --nproc "$GPUS" --method full --train llamaforge/datasets/instructions/train.jsonl \
        --out "$RUNS/fsdp" --max-steps 30 --samples 0 | tee "$OUT/fsdp.json"
fi
rm -rf "$RUNS"

echo "== 3. speed against transformers + peft on the same GPU"
"$PY" benchmarks/bench_sft.py --device cuda --configs sft-lora-bf16,sft-full-bf16,shape-lora-bf16 | tee "$OUT/bench_sft.txt"
"$PY" benchmarks/bench_classify.py --device cuda --configs lora-bf16,full-bf16,infer-bf16 --no-memory \
    | tee "$OUT/bench_classify.txt"
echo "gpu-check: done; figures in $OUT"

"""Classification fine-tuning speed: HF transformers + peft against llamaforge, same model (the
default SmolLM2 weights), same shapes, same hyperparameters, in one run.

    .venv/bin/python benchmarks/bench_classify.py [--rounds 3] [--no-memory] [--floor]
        [--configs lora-bf16,short-bf16,lora-fp32,full-bf16,full-fp32,infer-bf16,file]

Training: batch 8 x 128 tokens with no padding, LoRA r=16 alpha=32 on all seven linear layers
(dropout 0) or full fine-tuning, AdamW; `short`: LoRA at 16 x 24 tokens, the shape of a batch of
SST-2 phrases, where what surrounds the matrix products weighs most; both sides clip the gradient norm to 1.0 and use the
fused AdamW kernel, as HF's Trainer does by default. transformers computes bf16 the usual way,
under torch.autocast on an fp32 model; llamaforge keeps frozen weights in bf16 and fp32 master copies
of the trained ones, and steps through its own trainer (`trainer.fit`); a third column trains
as `--compile` does (the blocks through torch.compile; compilation is in the warm-up round).
Inference: batch 32 x 128, examples/s (transformers loaded in the dtype, llamaforge as `predict`
runs it, LoRA unmerged); and a whole file (SST-2 dev, when ../shared/data is beside the
checkout), transformers batching it in file order, llamaforge by length.

Speeds: both implementations live in one process and take turns, a block of steps each, round
after round, so that drift of this machine hits both alike; the figure is the median step.
Peak RSS: each implementation alone in a process of its own.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SST2_DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
B, T, B_INFER, BLOCK = 8, 128, 32, 3
DEVICE = "cpu"   # --device: where both sides run (scripts/gpu-check.sh gives cuda)
LORA = dict(r=16, alpha=32.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
LR = {"lora": 5e-4, "full": 2e-5}



sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402
from products_floor import FLOOR_HEADER, FLOOR_HELP, ProductsAlone, floor_columns  # noqa: E402


def batches(n, batch, seed=0, length=T):
    import torch
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(100, 40000, (batch, length), generator=g), torch.randint(0, 2, (batch,), generator=g))
            for _ in range(n)]


def hf_trainer_optimizer(model, lr):
    """The optimiser HF's Trainer builds by default with torch >= 2.8: fused AdamW (weight decay
    0.01 here, as llamaforge's default)."""
    import torch
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01, fused=True)


def hf_trainer_step(model, opt, dtype, **inputs):
    """One training step as HF's Trainer takes it by default: the loss under bf16 autocast (for
    dtype bf16), backward, the gradient norm clipped to 1.0 (as llamaforge's trainer does), the
    optimiser step."""
    import torch
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(step, data):
    times = []
    for ids, y in data:
        t = time.perf_counter()
        step(ids, y)
        times.append(time.perf_counter() - t)
    return times


def file_texts(path):
    from llamaforge.data.labelled import read_labelled
    return [e.text for e in read_labelled(path, "sentence", "label")]


class Transformers:
    def __init__(self, method, dtype, hf_dir, infer):
        import torch
        from transformers import LlamaForSequenceClassification
        load_dtype = torch.bfloat16 if infer and dtype == "bf16" else torch.float32
        self.model = LlamaForSequenceClassification.from_pretrained(hf_dir, num_labels=2, pad_token_id=0,
                                                                    dtype=load_dtype).to(DEVICE)
        self.infer, self.dtype = infer, dtype
        if infer:
            self.model.eval()
            return
        if method == "lora":
            from peft import LoraConfig, get_peft_model
            self.model = get_peft_model(self.model, LoraConfig(task_type="SEQ_CLS", r=LORA["r"], lora_alpha=LORA["alpha"],
                                                               lora_dropout=0.0, target_modules=LORA["targets"]))
        self.model.train()
        self.opt = hf_trainer_optimizer(self.model, LR[method])

    def step(self, ids, y):
        import torch
        if self.infer:
            with torch.inference_mode():
                self.model(ids.to(DEVICE))
            return
        hf_trainer_step(self.model, self.opt, self.dtype, input_ids=ids, labels=y)

    def block(self, data):
        return timed(self.step, data)

    def predict_file(self, seqs, pad_id):
        """As a user of transformers batches a file: in file order, 32 at a time, each batch padded
        to its longest text."""
        import torch

        from llamaforge.data.batching import pad_right
        self.model.config.pad_token_id = pad_id
        with torch.inference_mode():
            for i in range(0, len(seqs), B_INFER):
                self.model(pad_right(seqs[i:i + B_INFER], pad_id)[0].to(DEVICE))


class Llamaforge:
    def __init__(self, method, dtype, hf_dir, infer, compile=False):
        import torch

        from llamaforge.train.classify import ClassifyConfig, build_classifier
        cfg = ClassifyConfig(model="default", method=method, dtype=dtype, lora_rank=LORA["r"], lora_alpha=LORA["alpha"],
                             lora_dropout=0.0, lora_targets=LORA["targets"], lr=LR[method])
        torch.manual_seed(0)
        self.clf, self.tok = build_classifier(cfg, 2)
        self.clf.to(DEVICE)
        self.infer, self.method, self.compile = infer, method, compile
        if infer:
            self.clf.eval()

    def block(self, data):
        import torch

        from llamaforge.train.classify import predict_proba
        if self.infer:
            return timed(lambda ids, y: predict_proba(self.clf, ids.tolist(), 0, B_INFER), data)
        return trainer_step_times(self.clf, data, lambda m, d: (
            torch.nn.functional.cross_entropy(m(d[0].to(DEVICE)), d[1].to(DEVICE)), d[0].numel()), LR[self.method],
            self.compile)

    def predict_file(self, seqs, pad_id):
        from llamaforge.train.classify import predict_proba
        predict_proba(self.clf, seqs, pad_id, B_INFER)


def trainer_step_times(model, data: list, loss, lr: float, compile: bool = False) -> list[float]:
    """Seconds per step of llamaforge's own trainer (`trainer.fit`) on fixed batches; a step is
    the time between one loss call and the next. loss(model, batch) -> (loss, tokens).
    compile: as `--compile` trains (the first block, a warm-up, pays the compilation)."""
    from llamaforge.train.trainer import TrainConfig, fit
    stamps = []

    class Fixed:
        def train_batches(self, epoch, g):
            return [[i] for i in range(len(data))]   # a step a batch

        def loss(self, m, items):
            stamps.append(time.perf_counter())
            return loss(m, data[items[0]])

        def units(self, items):
            return 1   # loss() gives the batch's mean already

        def evaluate(self, m, world):
            return {"accuracy": 0.0}

        def save_model(self, m, out):
            pass
    with tempfile.TemporaryDirectory() as d:
        fit(model, Fixed(), TrainConfig(max_steps=len(data) + 1, batch_size=B, lr=lr, save_every=10_000, device=DEVICE,
                                        compile=compile), d)
    return [b - a for a, b in itertools.pairwise(stamps)]


def products_alone(method, dtype, hf_dir, infer):
    """--floor: the matrix products of llamaforge's step on each batch, alone (products_floor.py)."""
    import torch
    clf = Llamaforge(method, dtype, hf_dir, infer).clf

    def step_of(batch):
        ids, y = (t.to(DEVICE) for t in batch)
        return lambda: torch.nn.functional.cross_entropy(clf(ids), y).backward()
    return ProductsAlone(step_of, key=lambda batch: tuple(batch[0].shape))


IMPLS = {"transformers": Transformers, "llamaforge": Llamaforge,
         "llamaforge --compile": lambda *a: Llamaforge(*a, compile=True), "products alone": products_alone}
TRAIN_ONLY = {"llamaforge --compile", "products alone"}   # compilation is a training option; so is the floor
OPTIONAL = {"products alone"}   # only with --floor


def speed(method, dtype, hf_dir, infer, rounds, batch=None, length=T, floor=False):
    """Median step seconds per implementation, in alternating blocks, after one warm-up block."""
    impls = {name: cls(method, dtype, hf_dir, infer) for name, cls in IMPLS.items()
             if not (infer and name in TRAIN_ONLY) and (floor or name not in OPTIONAL)}
    batch = batch or (B_INFER if infer else B)
    blocks = BLOCK if length >= 64 else 4 * BLOCK   # short steps: more of them per block
    times = {name: [] for name in impls}
    for r in range(rounds + 1):
        for name, impl in impls.items():
            t = impl.block(batches(blocks, batch, seed=r, length=length))
            if r:
                times[name] += t
    return {name: batch * (1 if infer else length) / statistics.median(t) for name, t in times.items()}


def file_speed(dtype, hf_dir, path, rounds):
    from llamaforge.formats.load import load
    _, tok = load("default")
    seqs = [s[:128] for s in tok.encode_batch(file_texts(path))]
    impls = {name: cls("lora", dtype, hf_dir, True) for name, cls in IMPLS.items() if name not in TRAIN_ONLY}
    times = {name: [] for name in impls}
    for _ in range(rounds):
        for name, impl in impls.items():
            t = time.perf_counter()
            impl.predict_file(seqs, tok.pad_id)
            times[name].append(time.perf_counter() - t)
    return {name: len(seqs) / statistics.median(t) for name, t in times.items()}


def peak_rss(impl, method, dtype, hf_dir, infer):
    """Peak RSS (MB) of one implementation alone: load, then a few steps."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_classify as b; "
            f"m = b.IMPLS[{impl!r}]({method!r}, {dtype!r}, {hf_dir!r}, {infer}); "
            f"m.block(b.batches(2, b.B_INFER if {infer} else b.B)); "
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (big) parent across fork + exec.
            f"print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"{impl} {method} {dtype} failed:\n{r.stderr[-3000:]}")
    return float(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default="lora-bf16,short-bf16,lora-fp32,full-bf16,full-fp32,infer-bf16,file",
                    help="short: LoRA at 16 x 24 tokens (an SST-2 batch); file: predict on SST-2 dev in bf16 and fp32")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS processes")
    ap.add_argument("--no-speed", action="store_true", help="only the peak-RSS processes")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where both implementations run")
    ap.add_argument("--floor", action="store_true", help=FLOOR_HELP)
    args = ap.parse_args()
    print_machine()
    global DEVICE
    DEVICE = args.device
    from llamaforge.export import export
    with tempfile.TemporaryDirectory() as d:
        # transformers reads the same SmolLM2 weights from an HF directory (loading the GGUF
        # itself takes it ~17 s of metadata parsing).
        hf_dir = str(export("default", "hf", str(Path(d) / "smollm2")))
        print(f"{'config':<11} {'unit':<11} {'transformers':>12} {'llamaforge':>11} {'ratio':>6} {'--compile':>10} "
              f"{'ratio':>6}   peak RSS MB (hf / ours)"
              + (FLOOR_HEADER if args.floor else ""))

        def row(config, unit, v, mem):
            c = v.get("llamaforge --compile")
            compiled = f"{c:10.1f} {c / v['transformers']:5.2f}x" if c else f"{'':10} {'':6}"
            floor = floor_columns(v["transformers"], v["llamaforge"], c, v.get("products alone")) if c else ""
            print(f"{config:<11} {unit:<11} {v['transformers']:12.1f} {v['llamaforge']:11.1f} "
                  f"{v['llamaforge'] / v['transformers']:5.2f}x {compiled}   {mem}{floor}", flush=True)

        configs = args.configs.split(",")
        for config in (c for c in configs if c != "file"):
            kind, dtype = config.split("-")
            infer = kind == "infer"
            method = "lora" if kind in ("infer", "short") else kind
            shape = dict(batch=16, length=24) if kind == "short" else {}   # SST-2 phrases: ~24 tokens at most
            v = {i: float("nan") for i in ("transformers", "llamaforge")} if args.no_speed else \
                speed(method, dtype, hf_dir, infer, args.rounds, floor=args.floor, **shape)
            mem = "" if args.no_memory or kind == "short" else " / ".join(f"{peak_rss(i, method, dtype, hf_dir, infer):.0f}"
                                                       for i in ("transformers", "llamaforge"))
            row(config, "examples/s" if infer else "tokens/s", v, mem)
        if "file" in configs and SST2_DEV.exists() and not args.no_speed:
            for dtype in ("bf16", "fp32"):
                row(f"file-{dtype}", "examples/s", file_speed(dtype, hf_dir, SST2_DEV, args.rounds),
                    f"(predict on SST-2 dev, {SST2_DEV.name}: 872 texts)")


if __name__ == "__main__":
    main()

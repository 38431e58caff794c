"""Pretraining: a Llama from scratch (or an existing model, continued) on plain text with the
next-token loss, on packed blocks of a memory-mapped token file. The loop is `trainer.fit`.

The corpus is tokenized once into a flat token file (documents separated by EOS) cached under
`~/.cache/llamaforge/tokens/` (or $LLAMAFORGE_CACHE), keyed by the SHA-256 of the text and of the
tokenizer, so a second run on the same corpus starts at once. The last `val_fraction` of the
stream is validation (or --val gives its own text).

Run directory: config.yaml, tokenizer/ (when trained here), metrics.json, samples.log (text
generated at each evaluation), best/ (an HF model directory), checkpoint/, tensorboard/, curves.png.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..data.corpus import corpus_files, documents
from ..errors import LlamaforgeError
from ..evaluate.lm import mean_loss, next_token_loss
from ..files import atomic_path, cache_dir
from ..formats import hf
from ..formats.load import load, parse_dtype
from ..model.adapters import refuse_prefix
from ..model.config import PRESETS, LlamaConfig
from ..model.generation import SamplingConfig, generate_from_ids
from ..model.llama import Llama
from ..provenance.modelcard import check_licence, write_run_cards
from ..text.convert import from_hf_dir
from ..text.training import save_trained_tokenizer, train_tokenizer
from .base import open_run, write_new_run
from .distributed import World, init_world
from .trainer import UNBOUNDED_EPOCHS, TrainConfig, fit, write_metrics


@dataclass
class PretrainConfig(TrainConfig):
    data: str | None = None               # a text file, or a directory of *.txt files
    out: str | None = None
    val: str | None = None                # validation text; default: the tail of --data
    val_fraction: float = 0.05
    model: str | None = None              # continue pretraining this model (its weights and tokenizer)
    model_config: str = "tiny"            # from scratch: a preset (see `model.config.PRESETS`) ...
    dim: int | None = None                # ... with any of these changed
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    intermediate_size: int | None = None
    tokenizer: str | None = None          # from scratch: an HF tokenizer directory; default: train one
    vocab: int = 2048                     # size of the tokenizer trained when none is given
    block_size: int = 256                 # tokens per training row
    dtype: str = "bf16"
    epochs: int | None = None             # None: as many as --max-steps / --max-minutes allow
    batch_size: int = 16
    lr: float | None = None               # None: 2e-3 from scratch, 1e-4 continued
    schedule: str = "cosine"
    warmup: float = 100                   # steps (a fraction of a time-bounded run is unknown)
    weight_decay: float = 0.1
    eval_every: int | None = 100
    eval_blocks: int = 64                 # validation blocks scored at each evaluation
    sample_tokens: int = 96
    metric: str = "loss"
    greater_is_better: bool = False

    def __post_init__(self):
        if self.lr is None:
            self.lr = 1e-4 if self.model else 2e-3
        if self.epochs is None and (self.max_steps or self.max_minutes):
            self.epochs = UNBOUNDED_EPOCHS   # the step or time limit ends the run
        if self.warmup < 1 and self.epochs == UNBOUNDED_EPOCHS and not self.max_steps:
            raise LlamaforgeError("a run bounded by --max-minutes has no step total: give --warmup in steps (>= 1)")
        if self.model_config not in PRESETS:
            raise LlamaforgeError(f"unknown model config {self.model_config!r}; presets: {', '.join(sorted(PRESETS))}")
        if self.dtype not in ("bf16", "fp32"):
            raise LlamaforgeError(f"dtype must be bf16 or fp32, not {self.dtype!r}")
        if self.block_size < 8:
            raise LlamaforgeError(f"block-size must be at least 8, got {self.block_size}")
        if not 0 < self.val_fraction < 1:
            raise LlamaforgeError(f"val-fraction must be between 0 and 1, got {self.val_fraction}")
        super().__post_init__()


# --- the corpus ----------------------------------------------------------------------------------

def token_file(files: list[Path], tok, name: str = "corpus", quiet: bool = False) -> np.ndarray:
    """The corpus as one memory-mapped token array (documents joined by EOS), made once and
    reused while the text and the tokenizer stay the same."""
    key = hashlib.sha256()
    for f in files:
        key.update(hashlib.sha256(f.read_bytes()).digest())
    key.update(tok.backend.to_str().encode())
    path = cache_dir("tokens") / f"{key.hexdigest()[:24]}.bin"
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    if path.exists():
        if not quiet:
            print(f"llamaforge: {name}: tokens from the cache ({path})", file=sys.stderr)
        return np.memmap(path, dtype=dtype, mode="r")
    from tqdm import tqdm
    sep = tok.eos_id if tok.eos_id is not None else tok.pad_id
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    # An interrupted or failed run leaves no partial token file; the pid keeps two runs apart.
    with atomic_path(path, suffix=f".{os.getpid()}.tmp") as tmp, open(tmp, "wb") as out:
        docs = list(documents(files))
        for s in tqdm(range(0, len(docs), 1000), desc=f"tokenize {name}", unit="kdoc", file=sys.stderr,
                      dynamic_ncols=True):
            ids = [t for d in tok.encode_batch(docs[s:s + 1000], add_special_tokens=False) for t in d + [sep]]
            out.write(np.asarray(ids, dtype=dtype).tobytes())
            n += len(ids)
        if n == 0:
            raise LlamaforgeError(f"{', '.join(map(str, files))}: the corpus is empty")
    print(f"llamaforge: {name}: {n:,} tokens, cached in {path}", file=sys.stderr)
    return np.memmap(path, dtype=dtype, mode="r")


# --- the model -----------------------------------------------------------------------------------

def new_model_config(cfg: PretrainConfig, vocab_size: int) -> LlamaConfig:
    sizes = {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size")
             if getattr(cfg, k) is not None}
    base = PRESETS[cfg.model_config]
    if "n_heads" in sizes and "n_kv_heads" not in sizes:
        sizes["n_kv_heads"] = sizes["n_heads"]
    if "dim" in sizes or "n_heads" in sizes:
        sizes["head_dim"] = sizes.get("dim", base.dim) // sizes.get("n_heads", base.n_heads)
    # Vocabulary rounded up to a multiple of 64: faster matmuls, and unused rows cost nothing.
    return replace(base, vocab_size=-(-vocab_size // 64) * 64, max_seq_len=max(base.max_seq_len, cfg.block_size),
                   **sizes)


def build_model(cfg: PretrainConfig, out: Path, texts, world: World | None = None):
    """(model, tokenizer): continued from cfg.model, or new with random weights (under torchrun
    rank 0 trains the tokenizer, and the others read it)."""
    world = world or World()
    if cfg.model:
        model, tok = load(cfg.model, dtype=cfg.dtype)
        refuse_prefix(model, cfg.model)
        if cfg.block_size > model.config.max_seq_len:
            raise LlamaforgeError(f"block-size {cfg.block_size} exceeds the model's context of {model.config.max_seq_len}")
        return model.requires_grad_(True), tok
    if cfg.tokenizer:
        tok = from_hf_dir(Path(cfg.tokenizer))
    elif (out / "tokenizer" / "tokenizer.json").exists():   # trained by this run before a resume
        tok = from_hf_dir(out / "tokenizer")
    else:
        if world.main:
            world.log(f"llamaforge: training a {cfg.vocab}-token byte-level BPE tokenizer on the corpus "
                      f"(give --tokenizer DIR to use another)")
            save_trained_tokenizer(train_tokenizer(texts(), cfg.vocab), out / "tokenizer")
        world.barrier()
        tok = from_hf_dir(out / "tokenizer")
    torch.manual_seed(cfg.seed)
    model = Llama(new_model_config(cfg, tok.vocab_size))
    init_weights(model)
    return model.to(parse_dtype(cfg.dtype)), tok


@torch.no_grad()
def init_weights(model):
    """GPT-2 / nanoGPT initialisation: normal(0, 0.02), output projections of each residual
    branch scaled by 1/sqrt(2 * layers) so the residual stream does not grow with depth."""
    std = 0.02
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            p.normal_(0, std / math.sqrt(2 * model.config.n_layers))
        elif p.dim() >= 2:
            p.normal_(0, std)
        else:
            p.zero_()


# --- the task for trainer.fit -------------------------------------------------------------------

class PretrainTask:
    def __init__(self, cfg: PretrainConfig, train: np.ndarray, val: np.ndarray, tok, out: Path):
        self.cfg, self.train, self.val, self.tok, self.out = cfg, train, val, tok, out
        B = cfg.block_size
        if len(train) < B + 1:
            raise LlamaforgeError(f"the training text has {len(train)} tokens, fewer than one block of {B}; "
                                  f"lower --block-size or give more text")
        if len(val) < B // 4:
            raise LlamaforgeError(f"the validation text has only {len(val)} tokens")
        self.starts = list(range(0, len(train) - B, B))
        # Validation: evenly spaced blocks, always the same ones, so evaluations compare.
        n_val = max(1, min(cfg.eval_blocks, (len(val) - 1) // B))
        starts = np.linspace(0, max(0, len(val) - B - 1), n_val).astype(int).tolist()
        self.val_pairs = [(ids, ids) for ids in (self.block(val, s).tolist() for s in starts)]
        self.last_sample = ""

    def block(self, tokens, start: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(tokens[start:start + self.cfg.block_size], dtype=np.int64))

    def train_batches(self, epoch, generator):
        order = torch.randperm(len(self.starts), generator=generator).tolist()
        bs = self.cfg.batch_size
        return [[self.starts[i] for i in order[s:s + bs]] for s in range(0, len(order), bs)]

    def loss(self, model, starts):
        x = torch.stack([self.block(self.train, s) for s in starts])
        loss, _ = next_token_loss(model, x, x, reduction="sum")
        return loss, x.numel()

    def units(self, starts):
        return len(starts) * (self.cfg.block_size - 1)   # every token of a block but the first is predicted

    def evaluate(self, model, world):
        loss, _ = mean_loss(model, self.val_pairs, self.tok.pad_id, self.cfg.batch_size, world=world)
        if world.main:
            self.last_sample = self.sample(model)
            with open(self.out / "samples.log", "a", encoding="utf-8") as f:
                f.write(f"=== val loss {loss:.4f}\n{self.last_sample}\n\n")
        return {"loss": loss, "perplexity": math.exp(loss)}

    def sample(self, model) -> str:
        """A continuation of the start of the validation text (seeded, temperature 0.8)."""
        prompt = np.asarray(self.val[:8], dtype=np.int64).tolist()
        cfg = SamplingConfig(max_new_tokens=self.cfg.sample_tokens, temperature=0.8, top_p=0.95, seed=self.cfg.seed)
        text = generate_from_ids(model, self.tok, [prompt], cfg)[0]
        model.clear_cache()
        return self.tok.decode(prompt, skip_special_tokens=True) + text

    def format_metrics(self, metrics):
        return f"val perplexity {metrics['perplexity']:.2f}; sample:\n{self.last_sample}"

    def save_model(self, model, out_dir):
        hf.write_model(model, self.tok, out_dir)


# --- the command ---------------------------------------------------------------------------------

def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    """Train; keep the best model by validation loss; returns its validation loss and perplexity
    (under torchrun: on rank 0; the other ranks return None)."""
    world = init_world(cfg.device)
    cfg, out = open_run(cfg, resume, required="data")
    if cfg.epochs is None:
        raise LlamaforgeError("say how long to train: --max-steps, --max-minutes or --epochs")
    files = corpus_files(cfg.data)
    if next(documents(files), None) is None:
        raise LlamaforgeError(f"{cfg.data}: the corpus is empty")
    write_new_run(cfg, out, resume, world)   # first, so that a run interrupted from here on can be resumed
    model, tok = build_model(cfg, out, lambda: documents(files), world)

    def tokens_of(path) -> np.ndarray:   # rank 0 tokenizes; the others then read its cache
        tokens = token_file(corpus_files(path), tok, name=str(path)) if world.main else None
        world.barrier()
        return tokens if world.main else token_file(corpus_files(path), tok, name=str(path), quiet=True)

    tokens = tokens_of(cfg.data)
    if cfg.val:
        train, val = tokens, tokens_of(cfg.val)
    else:
        cut = int(len(tokens) * (1 - cfg.val_fraction))
        train, val = tokens[:cut], tokens[cut:]
    n_params = sum(p.numel() for p in model.parameters())
    world.log(f"llamaforge: {len(train):,} train / {len(val):,} validation tokens; model {n_params / 1e6:.2f}M "
              f"parameters ({model.config.n_layers} layers, dim {model.config.dim}), {cfg.dtype}")
    terms = check_licence(cfg.model, out) if world.main else None
    history = fit(model, PretrainTask(cfg, train, val, tok, out), cfg, out, resume=resume, world=world)
    if not world.main:
        return None
    best = min(history["evals"], key=lambda e: e["loss"])
    final = {"loss": best["loss"], "perplexity": best["perplexity"], "step": best["step"],
             "tokens": history["state"]["tokens"]}
    write_metrics(out, history, final)
    data = [str(f) for f in files] + ([str(f) for f in corpus_files(cfg.val)] if cfg.val else [])
    write_run_cards(out, "pretrain", cfg, data, final, ["text-generation"], terms)
    return final

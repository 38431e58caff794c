"""Shared fixtures: tiny random models and tokenizers the tests make themselves, and the real
SmolLM2 checkpoint (loaded once per session)."""
from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from llamaforge.formats.checkpoint import Checkpoint
from llamaforge.model.config import LlamaConfig
from llamaforge.text.tokenizer import Tokenizer

torch.set_num_threads(2)

MIXED_TEXT = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "我爱自然语言处理，今天天气很好。",
    "Emoji: 🦙🔥👍🏽 and a flag 🇫🇷.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x: print('ok')",
    "   leading spaces and    runs of   whitespace\n\n\n  and tabs\t\there  ",
    "Numbers 12345 and 3.14159, dates 2026-11-23, and Über-naïve café.",
    "Mixed: llama 羊驼 🦙 `code` <tag> {json: [1, 2]}",
]


def corpus_lines(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic training text for tiny tokenizers: English, Chinese, digits, code, emoji."""
    rng = random.Random(seed)
    words = ("the a llama model runs fast on small cpu and we train it with text data to learn "
             "tokens words numbers code def return print if else for while 我 爱 羊驼 模型 训练 数据 "
             "🦙 🔥 x y z 0 1 2 3 4 5 6 7 8 9").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(n)] + MIXED_TEXT


@pytest.fixture(scope="session")
def bpe_tokenizer_json(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE tokenizer.json with ChatML special tokens, trained here."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus_lines(), trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    backend.save(str(path))
    return path


def bpe_tokenizer(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    from llamaforge.text.chat_template import DEFAULT_CHAT_TEMPLATE
    return Tokenizer(Backend.from_file(str(path)), kind="bpe", bos_token="<|im_start|>", eos_token="<|im_end|>",
                     pad_token="<|endoftext|>", chat_template=DEFAULT_CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> Path:
    """A SentencePiece BPE model trained here with Llama's options (byte fallback, split digits,
    whitespace-only pieces, identity normalisation)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("\n".join(corpus_lines(2000)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return d / "tokenizer.model"


@torch.no_grad()
def randomize_parameters(model, std: float, suffixes=("lora_B",), seed: int = 0):
    """Normal(0, std) values for the parameters whose names end with `suffixes`, from one seeded
    generator in parameter order: two models of the same structure get the same values. LoRA's B
    starts at zero; made non-zero, the LoRA path changes the output and gradients reach A."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(tuple(suffixes)):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def random_model(preset: str, tokenizer: Tokenizer, seed: int = 0, **overrides):
    """A tiny model with random weights: (our Checkpoint, its twin in HF transformers)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from llamaforge.formats.hf import config_to_hf

    cfg = LlamaConfig.from_name(preset, **overrides)
    torch.manual_seed(seed)
    hf_cfg = config_to_hf(cfg)
    hf = LlamaForCausalLM(HFConfig(**hf_cfg)).float().eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    state = {(k[len("model."):] if k.startswith("model.") else k): v.detach().clone()
             for k, v in hf.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return Checkpoint(cfg, state, tokenizer, {"name": f"random-{preset}"}), hf


@pytest.fixture(scope="session")
def tiny_bpe(bpe_tokenizer_json) -> Tokenizer:
    return bpe_tokenizer(bpe_tokenizer_json)


@pytest.fixture(scope="session")
def default_checkpoint():
    from llamaforge.formats.load import load_checkpoint
    return load_checkpoint("default")


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own GGUF loader on the same file: the reference for parity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamaforge.formats.paths import default_model_path
    p = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return model, tok


def hf_model_from_dir(path) -> "torch.nn.Module":
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def peft_agreement(ours, theirs, base, vocab: int = 500) -> tuple[float, float]:
    """(max |logit difference| between our model with an adapter and PEFT's model with the same
    adapter, max |logit difference| between ours and the base without it) on random ids: the
    first must be tiny, the second not (the adapter changed the model, and PEFT agrees on how)."""
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(ids)
        return ((logits - theirs(input_ids=ids).logits).abs().max().item(),
                (logits - base(input_ids=ids).logits).abs().max().item())


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_bpe) -> Path:
    """A tiny random Llama (GQA, tied embeddings) saved as an HF directory, with the tiny BPE."""
    from llamaforge.formats import hf
    ckpt, _ = random_model("tiny", tiny_bpe)
    out = tmp_path_factory.mktemp("tiny-model") / "model"
    hf.save(ckpt, out)
    return out


def sentiment_file(split: str) -> Path:
    """The small sentiment data set that ships with llamaforge."""
    return Path(__file__).resolve().parent.parent / "llamaforge" / "datasets" / "sentiment" / f"{split}.csv"


def run_until_first_checkpoint(cmd: list[str], ckpt: Path, env=None) -> int:
    """Start a training command, SIGKILL it as soon as it has written a checkpoint in the
    directory `ckpt`; the step saved."""
    import os
    import signal
    import subprocess
    import time
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (ckpt / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    from llamaforge.train.checkpoint import read_meta
    return read_meta(ckpt)["state"]["step"]


def same_run_metrics(a, b, rel: float = 1e-5, path: str = "metrics"):
    """Assert two runs' metrics (nested dicts and lists) agree: counts, accuracies and every other
    exact figure equal; losses (float sums of many products) within `rel`. A run resumed from its
    checkpoint retraces the uninterrupted run's steps, but CI once saw its loss one float rounding
    apart (0.67524993 against 0.67524999, the same predictions) where no second run here could
    reproduce it; a wrong resume (the data position, the dropout RNG, AdamW's moments) moves the
    loss by far more than 1e-5."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{path}: {sorted(a.keys() ^ b.keys())}"
        for key in a:
            same_run_metrics(a[key], b[key], rel, f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: {len(a)} against {len(b)} entries"
        for n, (x, y) in enumerate(zip(a, b, strict=True)):
            same_run_metrics(x, y, rel, f"{path}[{n}]")
    elif path.rstrip("]0123456789[").endswith("loss"):   # "evals[2].loss", "evals.loss[3]"
        assert a == pytest.approx(b, rel=rel), f"{path}: {a} against {b}"
    else:
        assert a == b, f"{path}: {a} against {b}"


@contextmanager
def kernel_calls():
    """The names of the CPU kernels (llamaforge.model.kernels' extension) called inside the
    block, in order: shows that a kernel ran, not only that the numbers agree."""
    from llamaforge.model import kernels
    calls, real = [], kernels.gemv_extension()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)
    kernels._extension = Spy()
    try:
        yield calls
    finally:
        kernels._extension = real

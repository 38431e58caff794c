"""How much Chinese sentiment does the default model know? Linear probes on ChnSentiCorp.

    .venv/bin/python benchmarks/probe_chnsenticorp.py [--train-n 1500] [--dev-n 600] [--max-length 56]

Prints dev accuracy of logistic regressions (L-BFGS, L2) on
- character unigrams + bigrams of the raw text (no model at all), from all and from 3,000 reviews;
- the frozen model's hidden states (bf16), at layers 8 / 16 / 24 / 30, of the last token and the
  mean over tokens, of each review's last `--max-length` tokens, bare and inside a prompt.
and the tokenizer's tokens per character. Fine-tuning starts from these representations: where a
probe on them is far below the character baseline, the model's Chinese, not the recipe, limits
what ten minutes of fine-tuning reach. The character classifier is the peer here: what the
data allows without any language model. Needs ../shared/data/chnsenticorp beside the checkout.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from collections import Counter
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "chnsenticorp"
LAYERS = (8, 16, 24, 30)
PROMPTS = {"bare": ("", ""), "prompt": ("Review: ", "\nSentiment (positive or negative):")}



sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402


def read(path):
    from llamaforge.data.labelled import read_labelled
    rows = read_labelled(path, "text_a", "label")
    return [r.text for r in rows], [int(r.label) for r in rows]


def logistic_regression(x_train, y_train, x_dev, l2: float) -> torch.Tensor:
    """Predicted dev labels of an L2-regularised logistic regression fitted by L-BFGS."""
    w = torch.zeros(x_train.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    y = torch.tensor(y_train, dtype=torch.float32)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = (x_train @ w[:, None]).squeeze(-1) + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 * w.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return ((x_dev @ w[:, None]).squeeze(-1) + b > 0).long()


def char_ngrams(texts, vocab=None):
    """Sparse rows of log(1 + count) of character unigrams and bigrams, L2-normalised."""
    grams = [Counter(list(t) + [t[i:i + 2] for i in range(len(t) - 1)]) for t in texts]
    if vocab is None:
        total = Counter(g for c in grams for g in c)
        vocab = {g: i for i, g in enumerate(g for g, n in total.items() if n >= 2)}
    rows, cols, vals = [], [], []
    for r, c in enumerate(grams):
        feats = {vocab[g]: math.log1p(n) for g, n in c.items() if g in vocab}
        norm = math.sqrt(sum(v * v for v in feats.values())) or 1.0
        for j, v in feats.items():
            rows.append(r), cols.append(j), vals.append(v / norm)
    x = torch.sparse_coo_tensor([rows, cols], vals, (len(texts), len(vocab))).coalesce()
    return x, vocab


def accuracy(pred, gold) -> float:
    return 100 * (pred == torch.tensor(gold)).float().mean().item()


@torch.inference_mode()
def hidden_features(llama, tok, texts, max_length, prompt):
    """{(layer, 'last'|'mean'): (N, dim)} of each text's last max_length tokens, inside the prompt."""
    from llamaforge.data.batching import length_bucketed_batches, pad_right
    pre, post = (tok.encode(p, add_special_tokens=False) for p in prompt)
    bos = [tok.bos_id] if tok.add_bos else []
    seqs = [bos + pre + ids[-max_length:] + post for ids in tok.encode_batch(texts, add_special_tokens=False)]
    captured = {}
    hooks = [llama.layers[n - 1].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
             for n in LAYERS]
    out = {(n, pool): torch.empty(len(seqs), llama.config.dim) for n in LAYERS for pool in ("last", "mean")}
    for idx in length_bucketed_batches([len(s) for s in seqs], 32):
        ids, lengths = pad_right([seqs[i] for i in idx], tok.pad_id)
        llama.hidden_states(ids)
        real = (torch.arange(ids.shape[1])[None] < lengths[:, None]).float()[..., None]
        for n in LAYERS:
            h = captured[n].float()
            out[(n, "last")][idx] = h[torch.arange(len(idx)), lengths - 1]
            out[(n, "mean")][idx] = (h * real).sum(1) / lengths[:, None]
    for h in hooks:
        h.remove()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-n", type=int, default=1500, help="training reviews for the model probes")
    ap.add_argument("--dev-n", type=int, default=600, help="dev reviews for the model probes")
    ap.add_argument("--max-length", type=int, default=56)
    args = ap.parse_args()
    print_machine()
    if not DATA.exists():
        raise SystemExit(f"{DATA}: not found")
    x_train, y_train = read(DATA / "train.tsv")
    x_dev, y_dev = read(DATA / "dev.tsv")

    for n in (len(x_train), 3000):
        a, vocab = char_ngrams(x_train[:n])
        b, _ = char_ngrams(x_dev, vocab)
        pred = logistic_regression(a, y_train[:n], b, l2=1e-4)
        print(f"character 1-2 grams, {n} train reviews: dev accuracy {accuracy(pred, y_dev):.1f}% (all {len(x_dev)})",
              flush=True)

    from llamaforge.formats.load import load
    llama, tok = load("default", dtype="bf16")
    llama.eval()
    n_tokens = sum(len(ids) for ids in tok.encode_batch(x_train))
    print(f"tokens per character: {n_tokens / sum(len(t) for t in x_train):.2f}", flush=True)
    pick = random.Random(0).sample(range(len(x_train)), args.train_n)
    train_texts, train_y = [x_train[i] for i in pick], [y_train[i] for i in pick]
    dev_texts, dev_y = x_dev[:args.dev_n], y_dev[:args.dev_n]
    for name, prompt in PROMPTS.items():
        a = hidden_features(llama, tok, train_texts, args.max_length, prompt)
        b = hidden_features(llama, tok, dev_texts, args.max_length, prompt)
        for key in a:
            mean, std = a[key].mean(0), a[key].std(0) + 1e-6
            pred = logistic_regression((a[key] - mean) / std, train_y, (b[key] - mean) / std, l2=1e-2)
            print(f"frozen model, {name}, layer {key[0]:2d}, {key[1]:4}: dev accuracy {accuracy(pred, dev_y):.1f}% "
                  f"({args.train_n} train / {args.dev_n} dev reviews)", flush=True)


if __name__ == "__main__":
    main()

"""The next-token loss, and the perplexity built on it: one place for SFT, pretraining and
`evaluate --task perplexity | sft`."""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from ..data.batching import length_bucketed_batches, pad_labelled, share
from ..data.conversations import IGNORE
from ..model.device import to_device


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits (N, V) in any float dtype, computed in fp32 a few rows at a
    time, forward and backward. F.cross_entropy(logits.float()) makes (N, V) fp32 copies (the
    logits, their log-softmax, the gradient and its zeros): at 470 scored tokens of a 49k
    vocabulary, 92 MB each, freshly mapped memory whose page faults cost more than the arithmetic
    (~0.4 s of a 3.7 s SFT step on 2 cores). Rows of 2 MB stay in cache: the same 470 x 49,152
    bf16 logits take 43-52 against 122-133 ms forward and backward. Keeps each row's log-sum-exp
    for the backward, which writes the gradient in the logits' dtype, as autograd's cast would."""

    ROW_ELEMENTS = 1 << 19   # fp32 values per chunk: 2 MB

    @staticmethod
    def forward(ctx, logits, target):
        rows = max(1, ChunkedCrossEntropy.ROW_ELEMENTS // logits.shape[-1])
        lse, total = torch.empty(logits.shape[0], device=logits.device), torch.zeros((), device=logits.device)
        for i in range(0, logits.shape[0], rows):
            x = logits[i:i + rows].float()
            lse[i:i + rows] = torch.logsumexp(x, -1)
            total += (lse[i:i + rows] - x.gather(1, target[i:i + rows, None])[:, 0]).sum()
        ctx.save_for_backward(logits, target, lse)
        ctx.rows = rows
        return total

    @staticmethod
    def backward(ctx, grad_total):
        logits, target, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ctx.rows):
            p = (logits[i:i + ctx.rows].float() - lse[i:i + ctx.rows, None]).exp_()   # softmax
            p.scatter_add_(1, target[i:i + ctx.rows, None], p.new_full((p.shape[0], 1), -1.0))
            grad[i:i + ctx.rows] = p.mul_(grad_total)
        return grad, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy of (N, V) logits in fp32, in chunks on a CPU (see ChunkedCrossEntropy)."""
    if logits.device.type != "cpu" or reduction not in ("mean", "sum"):
        return F.cross_entropy(logits.float(), target, reduction=reduction)
    total = ChunkedCrossEntropy.apply(logits, target)
    return total / target.numel() if reduction == "mean" else total


def next_token_loss(model, ids, labels, position_ids=None, mask=None, reduction: str = "mean"):
    """(loss, scored tokens): cross-entropy of predicting labels[:, t + 1] at position t.

    Logits are computed only where a label is scored: on chat data most positions are prompt,
    and (B, T, vocab) fp32 logits of a 49k vocabulary would cost more than the model.
    """
    device = model.embed_tokens.weight.device   # batches are built on the CPU
    ids, labels = to_device(ids, device), to_device(labels, device)
    position_ids = None if position_ids is None else to_device(position_ids, device)
    mask = None if mask is None else to_device(mask, device)
    h = model.hidden_states(ids, position_ids, mask)
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = model.logits(h[:, :-1][keep])
    return cross_entropy(logits, target[keep], reduction=reduction), int(keep.sum())


def answer_logps(model, ids, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, scored tokens) of each row's labelled tokens, (B,) each: how
    likely the model finds an answer. Logits only at the scored positions, as next_token_loss."""
    device = model.embed_tokens.weight.device
    ids, labels = to_device(ids, device), to_device(labels, device)
    h = model.hidden_states(ids)
    target = labels[:, 1:]
    keep = target != IGNORE
    logp = model.logits(h[:, :-1][keep]).float().log_softmax(-1)
    token = logp.gather(-1, target[keep][:, None])[:, 0]
    row = keep.nonzero()[:, 0]
    sums = torch.zeros(ids.shape[0], dtype=torch.float32, device=device).index_add(0, row, token)
    return sums, keep.sum(-1)


@torch.inference_mode()
def mean_loss(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16,
              progress: bool = False, world=None) -> tuple[float, int]:
    """(mean loss over all scored tokens, their count) for encoded (ids, labels) pairs. With a
    training run's `world`, each rank scores its share and the sums are added up."""
    from tqdm import tqdm
    total, n = 0.0, 0
    if world is not None and world.distributed:
        pairs = share(pairs, world.rank, world.size)
    batches = length_bucketed_batches([len(p[0]) for p in pairs], batch_size)
    for idx in tqdm(batches, desc="score", unit="batch", file=sys.stderr, disable=not progress, dynamic_ncols=True):
        ids, labels = pad_labelled([pairs[i] for i in idx], pad_id)
        loss, k = next_token_loss(model, ids, labels, reduction="sum")
        total, n = total + float(loss), n + k
    if world is not None and world.distributed:
        total, n = world.sum([total, n])
    return total / max(n, 1), int(n)


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored) per window: windows of `window` tokens every `stride`, each
    scoring only the tokens the previous window did not, so every token after the first is
    scored once with up to window - stride tokens of context before it."""
    out, scored_to = [], 1
    for start in range(0, max(1, n_tokens - 1), stride):
        end = min(start + window, n_tokens)
        if end <= scored_to:
            break
        out.append((start, end, scored_to))
        scored_to = end
        if end == n_tokens:
            break
    return out


@torch.inference_mode()
def perplexity(model, ids: list[int], window: int, stride: int | None = None, batch_size: int = 4,
               progress: bool = False) -> dict:
    """Perplexity of one token stream with a sliding window: {"perplexity", "loss", "n"}."""
    from tqdm import tqdm
    stride = stride or window // 2
    windows = sliding_windows(len(ids), window, stride)
    total, n = 0.0, 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    # Windows of the same length go in one batch (all but the last are full length).
    for s in range(0, len(windows), batch_size):
        group = windows[s:s + batch_size]
        by_len: dict[int, list] = {}
        for w in group:
            by_len.setdefault(w[1] - w[0], []).append(w)
        for ws in by_len.values():
            x = torch.tensor([ids[a:b] for a, b, _ in ws])
            labels = x.clone()
            for r, (a, _, first) in enumerate(ws):
                labels[r, :first - a] = IGNORE
            loss, k = next_token_loss(model, x, labels, reduction="sum")
            total, n = total + float(loss), n + k
        bar.update(len(group))
    bar.close()
    loss = total / max(n, 1)
    return {"perplexity": math.exp(loss), "loss": loss, "n": n}


@torch.no_grad()
def pair_logps(model, encoded: list[tuple[list[int], list[int], list[int]]], pad_id: int,
               batch_size: int = 8) -> torch.Tensor:
    """(N, 2): the summed log-probability of each (prompt, chosen, rejected) pair's two answers."""
    from ..data.preferences import scored_rows
    out = []
    for s in range(0, len(encoded), batch_size):
        ids, labels = pad_labelled(scored_rows(encoded[s:s + batch_size]), pad_id)
        out.append(answer_logps(model, ids, labels)[0].view(-1, 2).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def preference_scores(model, encoded: list[tuple[list[int], list[int], list[int]]], pad_id: int, batch_size: int = 8,
                      reference=None, beta: float = 0.1) -> dict:
    """How often the model finds a pair's chosen answer likelier than its rejected one (summed
    log-probabilities), and by how much on average. With a reference model (a DPO run's base):
    also the implicit reward's accuracy and mean margin, beta x ((pc - rc) - (pr - rr))."""
    policy = pair_logps(model, encoded, pad_id, batch_size)
    margin = policy[:, 0] - policy[:, 1]
    scores = {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()), "n": len(encoded)}
    if reference is not None:
        ref = pair_logps(reference, encoded, pad_id, batch_size)
        reward = beta * (margin - (ref[:, 0] - ref[:, 1]))
        scores |= {"reward_accuracy": float((reward > 0).float().mean()), "reward_margin": float(reward.mean())}
    return scores

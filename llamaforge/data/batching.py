"""Batches: indices grouped by length so that padding wastes almost nothing, padded tensors, and
packed rows of several examples that never attend to each other."""
from __future__ import annotations

import torch

from .conversations import IGNORE


def length_bucketed_batches(lengths: list[int], batch_size: int, generator: torch.Generator | None = None,
                            bucket_batches: int = 50) -> list[list[int]]:
    """Index batches of similar length, so dynamic padding wastes almost nothing.

    With a generator (training): shuffle, sort each window of `bucket_batches` batches by length,
    cut it into batches, shuffle the batches, so order stays random but lengths within a batch
    match. Without (evaluation): sorted by length, longest first (a too-long batch fails at once).
    """
    n = len(lengths)
    if generator is None:
        order = sorted(range(n), key=lambda i: -lengths[i])
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    perm = torch.randperm(n, generator=generator).tolist()
    window = batch_size * bucket_batches
    batches = []
    for s in range(0, n, window):
        chunk = sorted(perm[s:s + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def share(items: list, k: int, n: int) -> list:
    """The k-th of n contiguous, nearly equal parts of items: a rank's (and micro-step's) part of
    a global batch, or a rank's part of the dev set. A batch is sorted by length, so a contiguous
    part pads least."""
    base, extra = divmod(len(items), n)
    start = k * base + min(k, extra)
    return items[start:start + base + (k < extra)]


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) padded on the right to the longest, lengths (B,))."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in seqs])


# --- causal-LM batches: padded, or packed --------------------------------------------------------

def pad_labelled(pairs: list[tuple[list[int], list[int]]], pad_id: int, ignore: int = IGNORE):
    """(ids, labels), each (B, T), padded on the right; padding is never scored."""
    ids, _ = pad_right([p[0] for p in pairs], pad_id)
    labels = torch.full(ids.shape, ignore, dtype=torch.long)
    for i, (_, lab) in enumerate(pairs):
        labels[i, :len(lab)] = torch.tensor(lab, dtype=torch.long)
    return ids, labels


def pack_rows(lengths: list[int], max_length: int, generator: torch.Generator, window: int = 1000) -> list[list[int]]:
    """Example indices grouped into rows of at most max_length tokens.

    Order is shuffled; then, window by window, the longest examples are placed first, each into
    the first row with room (first-fit decreasing fills rows to ~95%+), and the rows shuffled.
    """
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    rows = []
    for s in range(0, len(perm), window):
        open_rows: list[tuple[int, list[int]]] = []   # (free tokens, indices)
        for i in sorted(perm[s:s + window], key=lambda i: -lengths[i]):
            for r, (free, idx) in enumerate(open_rows):
                if lengths[i] <= free:
                    open_rows[r] = (free - lengths[i], idx + [i])
                    break
            else:
                open_rows.append((max_length - lengths[i], [i]))
        rows += [idx for _, idx in open_rows]
    order = torch.randperm(len(rows), generator=generator).tolist()
    return [rows[i] for i in order]


def packed_batch(pairs: list[tuple[list[int], list[int]]], rows: list[list[int]], pad_id: int, ignore: int = IGNORE):
    """(ids, labels, position_ids, mask) for rows of packed examples.

    Positions restart at 0 for each example and the boolean mask (B, 1, T, T) is causal within
    an example only, so a packed example computes exactly what it would alone.
    """
    T = max(sum(len(pairs[i][0]) for i in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), ignore, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)   # padding forms one more "document"
    for b, row in enumerate(rows):
        s = 0
        for d, i in enumerate(row):
            x, y = pairs[i]
            ids[b, s:s + len(x)] = torch.tensor(x)
            labels[b, s:s + len(y)] = torch.tensor(y)
            labels[b, s] = ignore   # never predicted from the previous example's last token
            pos[b, s:s + len(x)] = torch.arange(len(x))
            doc[b, s:s + len(x)] = d
            s += len(x)
        pos[b, s:] = torch.arange(T - s)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return ids, labels, pos, mask[:, None]

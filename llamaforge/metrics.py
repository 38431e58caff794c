"""Evaluation metrics and the figures people look at: the classification report (through
scikit-learn) and its table, the confusion matrix and the training curves, drawn as PNG."""
from __future__ import annotations

import os
from pathlib import Path


def classification_report(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict:
    """accuracy, micro / macro / weighted F1 (and macro / weighted precision and recall), n, and
    per_class: label -> precision, recall, f1, support. Classes with no prediction score 0
    precision, without a warning."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    report = {"accuracy": float(accuracy_score(y_true, y_pred)), "n": len(y_true)}
    for avg in ("micro", "macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=avg, zero_division=0)
        report.update({f"{avg}_precision": float(ap), f"{avg}_recall": float(ar), f"{avg}_f1": float(af)})
    report["per_class"] = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                  "support": int(s[i])} for i, name in enumerate(labels)}
    return report


def format_report(report: dict, title: str | None = None) -> str:
    """The report as a table, in the layout of scikit-learn's text report."""
    names = list(report["per_class"])
    width = max([len(n) for n in names] + [len("weighted avg")])
    lines = [title] if title else []
    lines.append(f"{'':>{width}}  precision    recall  f1-score   support")
    lines.append("")
    for n in names:
        c = report["per_class"][n]
        lines.append(f"{n:>{width}}  {c['precision']:9.4f} {c['recall']:9.4f} {c['f1']:9.4f} {c['support']:9d}")
    lines.append("")
    lines.append(f"{'accuracy':>{width}}  {'':9} {'':9} {report['accuracy']:9.4f} {report['n']:9d}")
    for avg in ("micro", "macro", "weighted"):
        lines.append(f"{avg + ' avg':>{width}}  {report[avg + '_precision']:9.4f} {report[avg + '_recall']:9.4f} "
                     f"{report[avg + '_f1']:9.4f} {report['n']:9d}")
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _save_png(fig, path: str | Path):
    """Write the figure atomically and free it."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def plot_confusion_matrix(y_true: list[int], y_pred: list[int], labels: list[str], path: str | Path, title: str = ""):
    from sklearn.metrics import confusion_matrix
    plt = _pyplot()

    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
    size = 2.5 + 0.5 * len(labels)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    _save_png(fig, path)
    return cm


def plot_curves(history: dict, metric: str, path: Path):
    """Training loss and the dev metric against optimiser steps, as one PNG."""
    fig, ax = _pyplot().subplots(1, 2, figsize=(10, 3.6))
    tr = history["train"]
    ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr])
    ax[0].set(title="training loss", xlabel="step", ylabel="loss")
    ev = [r for r in history["evals"] if metric in r]
    ax[1].plot([r["step"] for r in ev], [r[metric] for r in ev], marker="o")
    ax[1].set(title=f"dev {metric}", xlabel="step", ylabel=metric)
    for a in ax:
        a.grid(alpha=0.3)
    _save_png(fig, path)

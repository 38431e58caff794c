"""Evaluation metrics and the figures people look at: the classification report (through
scikit-learn) and its table, the task scores (SQuAD exact match and F1, BLEU and chrF through
sacrebleu, ROUGE through rouge-score), the confusion matrix and the training curves, drawn as PNG."""
from __future__ import annotations

import collections
import re
import string
from pathlib import Path

from ..files import atomic_path


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


# --- task scores -------------------------------------------------------------------------------

def squad_normalize(text: str) -> str:
    """SQuAD v1.1's official answer normalisation: lower case, no punctuation, no articles
    (a, an, the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = squad_normalize(prediction).split(), squad_normalize(reference).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_qa(predictions: list[str], references: list[list[str]]) -> dict:
    """Exact match and token F1, in percent, each the best over an item's references."""
    em = sum(max(float(squad_normalize(p) == squad_normalize(r)) for r in refs) for p, refs in zip(predictions, references, strict=True))
    f1 = sum(max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references, strict=True))
    n = len(predictions)
    return {"exact_match": 100 * em / n, "f1": 100 * f1 / n, "n": n}


def score_translation(predictions: list[str], references: list[list[str]]) -> dict:
    import sacrebleu
    refs = [[r[0] for r in references]]
    return {"bleu": sacrebleu.corpus_bleu(predictions, refs).score,
            "chrf": sacrebleu.corpus_chrf(predictions, refs).score, "n": len(predictions)}


def score_summaries(predictions: list[str], references: list[list[str]]) -> dict:
    """Mean ROUGE-1/2/L F-measure in percent (rouge-score, with stemming)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = collections.Counter()
    for p, refs in zip(predictions, references, strict=True):
        for k, s in scorer.score(refs[0], p).items():
            totals[k] += s.fmeasure
    n = len(predictions)
    return {k: 100 * totals[k] / n for k in ("rouge1", "rouge2", "rougeL")} | {"n": n}


# --- figures -------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _save_png(fig, path: str | Path):
    """Write the figure atomically and free it."""
    plt = _pyplot()
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".tmp.png") as tmp:   # the suffix tells matplotlib the format
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


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

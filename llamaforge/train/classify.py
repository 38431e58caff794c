"""Sequence classification: fine-tune a Llama with a `score` head (full or LoRA), evaluate it and
predict with it. Data and loss live here; the loop is `trainer.fit`.

Run directory:
    config.yaml          the resolved config (flags over --config YAML over defaults)
    label_map.json       id -> label name
    metrics.json         every dev evaluation, then the final dev / test reports
    best/                LoRA: adapter_config.json + adapter_model.safetensors (PEFT layout);
                         full: an HF LlamaForSequenceClassification directory
    checkpoint/          the last resumable checkpoint (see train/checkpoint.py)
    tensorboard/, curves.png, confusion_matrix.png
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.batching import length_bucketed_batches, pad_right, share
from ..data.labelled import LabelledText, check_truncation_side, encode_texts, label_ids, label_names, read_labelled
from ..errors import LlamaforgeError
from ..evaluate.metrics import classification_report, format_report, plot_confusion_matrix
from ..files import atomic_write_text
from ..formats import hf
from ..formats.checkpoint import Checkpoint
from ..formats.load import load
from ..formats.paths import classifier_labels, run_model_path
from ..model.adapters import LoRAConfig, load_peft_adapter, merge_lora, read_peft_config, save_peft_adapter
from ..model.device import resolve_device, to_device
from ..model.llama import LlamaForClassification
from ..provenance.modelcard import check_licence, write_run_cards
from .base import LORA_METHODS, FinetuneConfig, base_model_reference, open_run, write_new_run
from .distributed import init_world
from .runconfig import resolve_config
from .trainer import fit, write_metrics


@dataclass
class ClassifyConfig(FinetuneConfig):
    test: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    class_weights: str | None = None      # "balanced": weight classes by inverse frequency
    truncation_side: str = "right"        # which end of a text longer than max-length is dropped

    def __post_init__(self):
        if self.class_weights not in (None, "balanced"):
            raise LlamaforgeError(f"class-weights must be 'balanced' or unset, not {self.class_weights!r}")
        check_truncation_side(self.truncation_side)   # before the model loads, not at the first text
        super().__post_init__()


# --- model -------------------------------------------------------------------------------------

def build_classifier(cfg: ClassifyConfig, num_labels: int, model=None, lora: LoRAConfig | None = None):
    """(classifier, tokenizer) from the base model (cfg.model, or `model`), with the method's
    trainable parameters: LoRA layers of `lora` (default cfg's) and the new `score` head."""
    llama, tok = load(model or cfg.model, dtype=cfg.dtype)
    if cfg.method in LORA_METHODS:
        cfg.add_adapters(llama, lora)
    elif llama.lm_head is not None:
        llama.lm_head.requires_grad_(False)   # not used by classification
    clf = LlamaForClassification(llama, num_labels)
    clf.score.requires_grad_(True)
    return clf, tok


def save_classifier(clf: LlamaForClassification, out_dir: Path, cfg: ClassifyConfig, labels: list[str], tok):
    if cfg.method in LORA_METHODS:
        save_peft_adapter(clf, out_dir, cfg.lora(), "SEQ_CLS", modules_to_save=["score"],
                          base_model=base_model_reference(cfg.model))
        return
    hf.write_classifier(Checkpoint(clf.model.config, clf.model.state_dict(), tok), clf.score.weight, labels, out_dir)


def run_settings(run_dir: str | Path, dtype: str | None = None) -> tuple[ClassifyConfig, list[str]]:
    """(config, labels) of a classification run, read from its files alone (no model), so that
    what a command is given can be checked before a model loads."""
    run_dir = Path(run_dir)
    labels = classifier_labels(run_dir) if run_dir.is_dir() else None
    if labels is None:
        raise LlamaforgeError(f"{run_dir}: not a classification run directory (no config.yaml and label_map.json); "
                              f"to score a language model give --task")
    run_model_path(run_dir)   # it has a trained model
    cfg = resolve_config(ClassifyConfig, run_dir / "config.yaml")
    if dtype:
        cfg.dtype = dtype
    return cfg, labels


def load_run(run_dir: str | Path, dtype: str | None = None, device: str = "cpu"):
    """(classifier ready for inference on `device`, tokenizer, labels, config) from a run directory."""
    cfg, labels = run_settings(run_dir, dtype)
    best = run_model_path(Path(run_dir))
    if cfg.method in LORA_METHODS:
        clf, tok = build_classifier(cfg, len(labels), lora=read_peft_config(best))
        load_peft_adapter(clf, best)
        if cfg.dtype == "fp32":
            # Merged, inference runs at the base model's speed. Not in bf16: rounding W + BA to
            # bf16 loses much of a small update, and the predictions would drift from training's.
            merge_lora(clf.model)
    else:
        clf, tok = build_classifier(cfg, len(labels), model=best)
        with torch.no_grad():
            clf.score.weight.copy_(hf.classifier_head(best))
    return clf.to(resolve_device(device)).eval(), tok, labels, cfg


# --- data and loss -----------------------------------------------------------------------------

def read_split(path, cfg: ClassifyConfig, labelled=True) -> list[LabelledText]:
    return read_labelled(path, cfg.text_column, cfg.label_column if labelled else None, cfg.text_pair_column)


@torch.inference_mode()
def predict_proba(clf, seqs: list[list[int]], pad_id: int, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Class probabilities (N, C), in input order; batches of similar length (little padding)."""
    from tqdm import tqdm
    out = torch.empty(len(seqs), clf.score.out_features)
    batches = length_bucketed_batches([len(s) for s in seqs], batch_size)
    for idx in tqdm(batches, desc="predict", unit="batch", file=sys.stderr, disable=not progress, dynamic_ncols=True):
        ids, lengths = pad_right([seqs[i] for i in idx], pad_id)
        device = clf.score.weight.device
        out[idx] = clf(ids.to(device), lengths.to(device)).softmax(-1).float().cpu()
    return out


class ClassificationTask:
    """Token sequences with label ids, for `trainer.fit`."""

    def __init__(self, cfg, train_seqs, train_y, dev_seqs, dev_y, labels, tok):
        self.cfg, self.labels, self.tok = cfg, labels, tok
        self.train_seqs, self.train_y = train_seqs, torch.tensor(train_y)
        self.dev_seqs, self.dev_y = dev_seqs, dev_y
        self.lengths = [len(s) for s in train_seqs]
        # The dev probabilities of the last evaluation and of the best model's (rank 0: every
        # example's), so that the final dev report need not run the best model over dev again.
        self.dev_probs = self.best_dev_probs = None
        self.weight = None
        if cfg.class_weights == "balanced":
            counts = torch.bincount(self.train_y, minlength=len(labels)).float()
            self.weight = counts.sum() / (len(labels) * counts.clamp(min=1))

    def train_batches(self, epoch, generator):
        return length_bucketed_batches(self.lengths, self.cfg.batch_size, generator)

    def loss(self, model, idx):
        ids, lengths = pad_right([self.train_seqs[i] for i in idx], self.tok.pad_id)
        device = model.score.weight.device
        logits = model(to_device(ids, device), to_device(lengths, device))
        weight = None if self.weight is None else self.weight.to(device)
        return F.cross_entropy(logits, self.train_y[idx].to(device), weight=weight, reduction="sum"), \
            int(lengths.sum())

    def units(self, idx):
        """Examples, or with class weights their summed weights (cross-entropy's weighted mean)."""
        return len(idx) if self.weight is None else float(self.weight[self.train_y[idx]].sum())

    def evaluate(self, model, world):
        part = share(self.dev_seqs, world.rank, world.size)
        probs = torch.cat(world.gather(predict_proba(model, part, self.tok.pad_id, self.cfg.eval_batch_size)))
        self.dev_probs = probs
        report = classification_report(self.dev_y, probs.argmax(-1).tolist(), self.labels)
        # The mean cross-entropy of the dev labels (HF Trainer's eval_loss): unlike accuracy, it
        # moves with every example's probability, so it tells close runs apart.
        true = probs[torch.arange(len(self.dev_y)), torch.tensor(self.dev_y)]
        report["loss"] = float(-true.clamp(min=1e-12).log().mean())
        return report

    def format_metrics(self, report):
        return format_report(report)

    def save_model(self, model, out_dir):
        self.best_dev_probs = self.dev_probs   # fit saves the model it has just evaluated, when best
        save_classifier(model, out_dir, self.cfg, self.labels, self.tok)


# --- the commands --------------------------------------------------------------------------------

def finetune_classify(cfg: ClassifyConfig, resume: bool = False) -> dict:
    """Train, keep the best dev model, and report on dev and test. Returns the final reports
    (under torchrun: on rank 0; the other ranks return None)."""
    world = init_world(cfg.device)
    cfg, out = open_run(cfg, resume)
    if not cfg.dev:
        raise LlamaforgeError("--dev is required")
    train, dev = read_split(cfg.train, cfg), read_split(cfg.dev, cfg)
    test = read_split(cfg.test, cfg) if cfg.test else None
    labels = label_names(train)
    if len(labels) < 2:
        raise LlamaforgeError(f"{cfg.train}: needs at least two labels, found {labels}")
    train_y, dev_y = label_ids(train, labels), label_ids(dev, labels)
    test_y = label_ids(test, labels) if test else None

    torch.manual_seed(cfg.seed)   # the new head and LoRA factors start the same every run
    clf, tok = build_classifier(cfg, len(labels))
    enc = {name: encode_texts(tok, split, cfg.max_length, name=str(path), truncation_side=cfg.truncation_side)
           for name, split, path in (("train", train, cfg.train), ("dev", dev, cfg.dev), ("test", test, cfg.test)) if split}
    write_new_run(cfg, out, resume, world, {"label_map.json": {"id2label": {str(i): n for i, n in enumerate(labels)}}})
    n_train = sum(p.numel() for p in clf.parameters() if p.requires_grad)
    world.log(f"llamaforge: {len(train)} train / {len(dev)} dev examples, {len(labels)} labels; method {cfg.method}, "
              f"{n_train:,} trainable parameters, {cfg.dtype}")

    terms = check_licence(cfg.model, out) if world.main else None
    task = ClassificationTask(cfg, enc["train"], train_y, enc["dev"], dev_y, labels, tok)
    history = fit(clf, task, cfg, out, resume=resume, world=world)
    if not world.main:
        return None

    # Final reports come from the best model: its dev predictions from its evaluation in this run
    # (running it over dev again cost ~10% of an SST-2 epoch's command), the rest from the model as
    # saved, read back the way `evaluate` reads it (a resumed run's best may predate this process).
    del clf
    best = None
    final = {}
    for name, split_y in (("dev", dev_y), ("test", test_y)):
        if split_y is None:
            continue
        if name == "dev" and task.best_dev_probs is not None:
            probs = task.best_dev_probs
        else:
            if best is None:
                best, tok, labels, _ = load_run(out)
            probs = predict_proba(best, enc[name], tok.pad_id, cfg.eval_batch_size)
        pred = probs.argmax(-1).tolist()
        final[name] = classification_report(split_y, pred, labels)
        if name == "test" or not test:
            plot_confusion_matrix(split_y, pred, labels, out / "confusion_matrix.png", title=f"{name} (best model)")
    write_metrics(out, history, final)
    write_run_cards(out, "classify", cfg, [cfg.train, cfg.dev, cfg.test], final, ["text-classification"], terms)
    return final


def evaluate_classifier(run_dir: str | Path, data: str | Path, text_column: str | None = None,
                        label_column: str | None = None, text_pair_column: str | None = None,
                        batch_size: int = 64, dtype: str | None = None, device: str = "auto") -> dict:
    cfg, labels = run_settings(run_dir, dtype)
    cfg.text_column = text_column or cfg.text_column
    cfg.label_column = label_column or cfg.label_column
    cfg.text_pair_column = text_pair_column or cfg.text_pair_column
    examples = read_split(data, cfg)   # the data, its columns and labels before the model loads
    y = label_ids(examples, labels)
    clf, tok, _, _ = load_run(run_dir, dtype, device)
    seqs = encode_texts(tok, examples, cfg.max_length, name=str(data), truncation_side=cfg.truncation_side)
    probs = predict_proba(clf, seqs, tok.pad_id, batch_size, progress=True)
    return classification_report(y, probs.argmax(-1).tolist(), labels)


def predict_classifier(run_dir: str | Path, texts: list[str] | None = None, data: str | Path | None = None,
                       out: str | Path | None = None, text_column: str | None = None,
                       batch_size: int = 64, dtype: str | None = None, device: str = "auto") -> list[dict]:
    """Label and class probabilities per text, written to `out` (.csv or .jsonl) when given."""
    cfg, labels = run_settings(run_dir, dtype)
    if out and Path(out).suffix.lower() not in PREDICTION_FORMATS:
        raise LlamaforgeError(f"{out}: write predictions to a .csv, .tsv or .jsonl file")
    if data is not None:
        cfg.text_column = text_column or cfg.text_column
        examples = read_split(data, cfg, labelled=False)
    elif texts:
        examples = [LabelledText(t, None, None, f"argument {i + 1}") for i, t in enumerate(texts)]
    else:
        raise LlamaforgeError("give a TEXT or --data FILE to predict")
    clf, tok, _, _ = load_run(run_dir, dtype, device)   # once the input is known good
    seqs = encode_texts(tok, examples, cfg.max_length, name=str(data or "input"),
                        truncation_side=cfg.truncation_side)
    probs = predict_proba(clf, seqs, tok.pad_id, batch_size, progress=len(seqs) > batch_size)
    rows = [{"text": e.text, "label": labels[int(p.argmax())], **{f"p_{n}": round(float(p[i]), 6) for i, n in enumerate(labels)}}
            for e, p in zip(examples, probs, strict=True)]
    if out:
        write_predictions(rows, Path(out))
    return rows


PREDICTION_FORMATS = (".csv", ".tsv", ".jsonl")


def write_predictions(rows: list[dict], path: Path):
    import csv
    import io
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif path.suffix.lower() in (".csv", ".tsv"):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        w.writeheader()
        w.writerows(rows)
        text = buf.getvalue()
    else:
        raise LlamaforgeError(f"{path}: write predictions to a .csv, .tsv or .jsonl file")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)

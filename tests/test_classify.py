"""`finetune classify`, `evaluate` and `predict` end to end on a tiny random model and the
shipped sentiment data: run directory contents, PEFT / HF outputs, YAML config, resume after
SIGKILL to the same metrics, and the real SmolLM2 learning the task."""
import json
import subprocess
import sys

import pytest
import torch

from llamaforge.cli import main
from llamaforge.errors import LlamaforgeError
from llamaforge.train.checkpoint import read_meta
from llamaforge.train.classify import ClassifyConfig, evaluate_classifier, finetune_classify, predict_classifier
from llamaforge.train.trainer import TrainConfig, lr_at

from conftest import randomize_parameters, run_until_first_checkpoint, same_run_metrics, sentiment_file


def tiny_args(model_dir, out, *extra):
    return ["finetune", "classify", "--model", str(model_dir), "--train", str(sentiment_file("train")),
            "--dev", str(sentiment_file("dev")), "--out", str(out), "--batch-size", "16", "--dtype", "fp32", *extra]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    main(tiny_args(tiny_model_dir, out, "--test", str(sentiment_file("test")), "--epochs", "2", "--lr", "3e-3",
                   "--lora-rank", "4"))
    return out


def test_run_directory(lora_run):
    names = {p.name for p in lora_run.iterdir()}
    assert {"config.yaml", "label_map.json", "metrics.json", "best", "checkpoint", "tensorboard", "curves.png",
            "confusion_matrix.png"} <= names
    assert {p.name for p in (lora_run / "best").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                              "README.md"}   # the model card
    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert [e["step"] for e in metrics["evals"]] == [20, 40]       # each epoch: 320 examples / 16
    assert set(metrics["final"]) == {"dev", "test"}
    assert json.loads((lora_run / "label_map.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    for png in ("curves.png", "confusion_matrix.png"):
        assert (lora_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The checkpoint: DCP shards of tensors, and JSON (nothing to unpickle).
    state = read_meta(lora_run / "checkpoint")
    assert state["state"]["step"] == 40 and state["state"]["stopped"] == "done"


@pytest.mark.parametrize("content, message", [
    ("{", r"label_map\.json: not valid JSON"),
    ('["negative", "positive"]', r"label_map\.json: expected a JSON object"),
    ('{"id2label": {"1": "negative", "2": "positive"}}', r"label_map\.json: expected \{\"id2label\""),
])
def test_a_damaged_label_map_is_named(lora_run, tmp_path, content, message):
    import shutil
    run = shutil.copytree(lora_run, tmp_path / "run")
    (run / "label_map.json").write_text(content)
    with pytest.raises(LlamaforgeError, match=message):
        predict_classifier(run, texts=["fine"])


def test_tensorboard_events(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(lora_run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "dev/accuracy", "dev/macro_f1"} <= set(tags)
    assert [e.step for e in acc.Scalars("dev/accuracy")] == [20, 40]


def test_best_model_is_kept_and_evaluate_reproduces_it(lora_run, capsys):
    metrics = json.loads((lora_run / "metrics.json").read_text())
    best = max(metrics["evals"], key=lambda e: e["accuracy"])
    assert metrics["final"]["dev"]["accuracy"] == pytest.approx(best["accuracy"])
    # Each evaluation also records the dev loss: the mean cross-entropy of the dev labels, which
    # the best model's predictions give again.
    import csv
    import math
    dev = list(csv.DictReader(sentiment_file("dev").open(encoding="utf-8")))
    rows = predict_classifier(lora_run, data=sentiment_file("dev"))
    loss = -sum(math.log(r[f"p_{d['label']}"]) for r, d in zip(rows, dev, strict=True)) / len(dev)
    assert best["loss"] == pytest.approx(loss, rel=1e-3, abs=1e-4)
    main(["evaluate", str(lora_run), "--data", str(sentiment_file("dev")), "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert {"accuracy", "macro_f1", "micro_f1", "weighted_f1", "n", "per_class"} <= set(report)
    assert report["n"] == 80 and report["accuracy"] == pytest.approx(best["accuracy"])
    # The final dev report, made from the best model's evaluation during training, is the saved
    # model's, read back: every count and figure.
    assert report == metrics["final"]["dev"]
    assert set(report["per_class"]["positive"]) == {"precision", "recall", "f1", "support"}


def test_report_agrees_with_counting_the_predictions(lora_run):
    """evaluate's figures, recomputed by hand from predict's labels on the same file."""
    rows = predict_classifier(lora_run, data=sentiment_file("test"))
    truth = [line.rsplit(",", 1)[1] for line in sentiment_file("test").read_text().splitlines()[1:]]
    pred = [r["label"] for r in rows]
    ours = evaluate_classifier(lora_run, sentiment_file("test"))
    assert ours["accuracy"] == pytest.approx(sum(t == p for t, p in zip(truth, pred, strict=True)) / len(truth))
    f1 = {}
    for c in ("negative", "positive"):
        tp = sum(t == c and p == c for t, p in zip(truth, pred, strict=True))
        precision = tp / max(1, pred.count(c))
        recall = tp / truth.count(c)
        f1[c] = 2 * precision * recall / (precision + recall) if tp else 0.0
        assert ours["per_class"][c] == pytest.approx({"precision": precision, "recall": recall, "f1": f1[c],
                                                      "support": truth.count(c)})
    assert ours["macro_f1"] == pytest.approx(sum(f1.values()) / 2)
    assert ours["weighted_f1"] == pytest.approx(sum(f1[c] * truth.count(c) for c in f1) / len(truth))
    assert ours["micro_f1"] == pytest.approx(ours["accuracy"])   # single-label: micro F1 is accuracy


def test_predict_text_and_files(lora_run, tmp_path, capsys):
    main(["predict", str(lora_run), "great food", "terrible service"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["great food", "terrible service"]
    for r in rows:
        assert r["label"] in ("negative", "positive") and r["p_negative"] + r["p_positive"] == pytest.approx(1, abs=1e-5)
    for suffix in ("csv", "jsonl"):
        out = tmp_path / f"pred.{suffix}"
        main(["predict", str(lora_run), "--data", str(sentiment_file("dev")), "--out", str(out)])
        assert capsys.readouterr().out == ""
        lines = out.read_text().splitlines()
        assert len(lines) == 80 + (suffix == "csv")


def test_a_runs_truncation_side_is_used_by_evaluate_and_predict(lora_run, tmp_path, monkeypatch):
    """Two long texts with different beginnings and the same end: a run saved with
    `truncation_side: left` keeps only their ends, so it scores them alike; with `right` it keeps
    their beginnings, and does not. `evaluate` truncates as the run says too."""
    import shutil

    import yaml

    import llamaforge.train.classify as classify
    end = "and then the service, the rooms and the view were as they always are"
    texts = [f"{'great food ' * 6}{end}", f"{'terrible service ' * 6}{end}"]
    data = tmp_path / "long.csv"
    data.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in zip(texts, ("positive", "negative"), strict=True)))
    sides = []
    encode = classify.encode_texts
    monkeypatch.setattr(classify, "encode_texts", lambda *a, **k: sides.append(k["truncation_side"]) or encode(*a, **k))
    probs = {}
    for side in ("left", "right"):
        run = tmp_path / side
        shutil.copytree(lora_run, run)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg.update(truncation_side=side, max_length=8)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        probs[side] = [r["p_positive"] for r in predict_classifier(run, texts)]
        evaluate_classifier(run, data)
    assert sides == ["left", "left", "right", "right"]
    assert probs["left"][0] == pytest.approx(probs["left"][1], abs=1e-6)
    assert abs(probs["right"][0] - probs["right"][1]) > 1e-3


def test_full_finetune_saves_a_transformers_classifier(tiny_model_dir, tmp_path):
    from transformers import LlamaForSequenceClassification
    out = tmp_path / "full"
    main(tiny_args(tiny_model_dir, out, "--method", "full", "--max-steps", "3", "--lr", "1e-3"))
    hf = LlamaForSequenceClassification.from_pretrained(str(out / "best"), dtype=torch.float32).eval()
    assert hf.config.id2label == {0: "negative", 1: "positive"}
    from llamaforge.train.classify import load_run
    clf, tok, _, _ = load_run(out)
    from llamaforge.data.batching import pad_right
    ids, lengths = pad_right([tok.encode(t) for t in ["good", "a much longer and rather bad review"]], tok.pad_id)
    with torch.no_grad():
        assert (clf(ids, lengths) - hf(ids).logits).abs().max() < 1e-4


def transformers_probabilities(hf_dir, texts, tok):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([tok.encode(t)])).logits.softmax(-1)[0].tolist() for t in texts], model


@pytest.mark.parametrize("method", ["lora", "full"])
def test_info_and_export_of_a_classifier_run(method, lora_run, tiny_model_dir, tmp_path, capsys):
    """`info` describes a classifier run; `export --to hf` writes a LlamaForSequenceClassification
    directory (LoRA folded in) that transformers loads to the probabilities `predict` gives."""
    from llamaforge.formats.info import model_info
    from llamaforge.train.classify import load_run
    run = lora_run
    if method == "full":
        run = tmp_path / "full"
        main(tiny_args(tiny_model_dir, run, "--method", "full", "--max-steps", "3", "--lr", "1e-3"))
    info = model_info(str(run))
    assert info["classifier"]["labels"] == ["negative", "positive"] and info["classifier"]["method"] == method
    assert (info["adapter"] or {}).get("rank") == (4 if method == "lora" else None)
    main(["info", str(run)])
    assert "classifier       " + method in capsys.readouterr().out
    texts = ["The soup was cold and bland.", "Wonderful service, we will come back!", "一般般吧"]
    ours = predict_classifier(run, texts=texts, dtype="fp32")
    main(["export", str(run), "--to", "hf", str(tmp_path / "hf")])
    theirs, model = transformers_probabilities(tmp_path / "hf", texts, load_run(run)[1])
    assert model.config.id2label == {0: "negative", 1: "positive"}
    for o, t in zip(ours, theirs, strict=True):
        assert [o["p_negative"], o["p_positive"]] == pytest.approx(t, abs=1e-4)
    with pytest.raises(LlamaforgeError, match="score head has no place in a gguf file"):
        main(["--debug", "export", str(run), "--to", "gguf", str(tmp_path / "x.gguf")])
    assert not (tmp_path / "x.gguf").exists()


def test_yaml_config_and_flags(tiny_model_dir, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.001\nmax_steps: 2\nlora_rank: 2\nbatch_size: 8\n")
    out = tmp_path / "run"
    main(tiny_args(tiny_model_dir, out, "--config", str(cfg_file), "--lora-rank", "3"))
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    # YAML over defaults, flags over YAML (batch size 16 was given as a flag too).
    assert saved["lr"] == 0.001 and saved["max_steps"] == 2 and saved["lora_rank"] == 3 and saved["batch_size"] == 16
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    with pytest.raises(LlamaforgeError, match=r"bad\.yaml: unknown setting 'learning_rate'"):
        from llamaforge.train.runconfig import resolve_config
        resolve_config(ClassifyConfig, bad)


def test_existing_run_directory_is_not_overwritten(lora_run, tiny_model_dir):
    with pytest.raises(LlamaforgeError, match="exists and is not empty"):
        finetune_classify(ClassifyConfig(model=str(tiny_model_dir), train=str(sentiment_file("train")),
                                         dev=str(sentiment_file("dev")), out=str(lora_run)))


def test_each_evaluation_prints_the_report_table(tiny_model_dir, tmp_path, capsys):
    main(tiny_args(tiny_model_dir, tmp_path / "r", "--max-steps", "2", "--eval-every", "1"))
    captured = capsys.readouterr()
    assert captured.err.count("weighted avg") == 2          # steps 1 and 2, on stderr
    assert captured.out.count("weighted avg") == 1          # the final dev report, on stdout


def test_cli_errors_are_one_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text("text,label\ngood,pos\n,neg\n")
    r = subprocess.run([sys.executable, "-m", "llamaforge", *tiny_args(tiny_model_dir, tmp_path / "r")[:4], "--train",
                        str(bad), "--dev", str(bad), "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == f"llamaforge: error: {bad}:3: empty or missing 'text'"


def test_training_forward_matches_inference_on_smollm2():
    """On the real model: the training path (LoRA layers, gradients on, attention as matmuls) and
    the inference path (SDPA) give the same logits, and the LoRA gradient reaches every layer."""
    from llamaforge.data.batching import pad_right
    from llamaforge.train.classify import build_classifier
    torch.manual_seed(0)
    clf, tok = build_classifier(ClassifyConfig(dtype="fp32", lora_rank=4), 2)
    randomize_parameters(clf, 0.01)
    ids, lengths = pad_right([tok.encode(t) for t in ["The soup was cold.", "我很喜欢这本书，强烈推荐！"]], tok.pad_id)
    train_logits = clf.train()(ids, lengths)
    train_logits.sum().backward()
    with torch.no_grad():
        infer_logits = clf.eval()(ids, lengths)
    assert (train_logits.detach() - infer_logits).abs().max() < 1e-4
    grads = [p.grad for n, p in clf.named_parameters() if n.endswith("lora_A")]
    assert len(grads) == 30 * 7 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup=10, schedule="linear")
    assert lr_at(0, 110, cfg) == pytest.approx(1 / 11) and lr_at(10, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.5) and lr_at(110, 110, cfg) == 0
    cos = TrainConfig(lr=1.0, warmup=0, schedule="cosine")
    assert lr_at(50, 100, cos) == pytest.approx(0.5)
    assert lr_at(10, 100, cfg, time_fraction=0.75) == pytest.approx(0.25)   # the time budget anneals too


def test_resume_after_sigkill_ends_with_the_same_metrics(tiny_model_dir, tmp_path):
    """A run killed mid-epoch and resumed gives exactly the metrics of an uninterrupted run."""
    args = ["--epochs", "3", "--batch-size", "8", "--save-every", "7", "--lr", "2e-3", "--lora-rank", "4",
            "--lora-dropout", "0.1", "--eval-every", "25"]
    cmd = [sys.executable, "-m", "llamaforge"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(cmd + tiny_args(tiny_model_dir, whole, *args), check=True, capture_output=True)

    step = run_until_first_checkpoint(cmd + tiny_args(tiny_model_dir, killed, *args), killed / "checkpoint")
    assert 0 < step < 120 and step % 40 != 0, "the run should die mid-epoch"
    if (killed / "metrics.json").exists():
        assert "final" not in json.loads((killed / "metrics.json").read_text()), "the run should not have finished"

    r = subprocess.run(cmd + ["finetune", "classify", "--out", str(killed), "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, killed))
    strip = lambda evals: [{k: v for k, v in e.items() if k not in ("train_minutes", "eval_seconds")} for e in evals]
    same_run_metrics(strip(a["evals"]), strip(b["evals"]), path="evals")
    same_run_metrics(a["final"], b["final"], path="final")


def test_a_resumed_run_may_go_on_longer_but_not_change(lora_run, tiny_model_dir, tmp_path, capsys):
    """--resume keeps the run's settings: a flag that would change it is refused, naming the
    flag; --epochs (and the other limits) extend a finished run from its last checkpoint."""
    import shutil
    run = shutil.copytree(lora_run, tmp_path / "run")
    with pytest.raises(LlamaforgeError, match=r"--lr 0\.01 differs from the run's 0\.003 .*may change only --epochs"):
        main(["--debug", "finetune", "classify", "--out", str(run), "--resume", "--lr", "1e-2"])
    with pytest.raises(LlamaforgeError, match=r"--lora-rank 8 differs from the run's 4"):
        main(["--debug", "finetune", "classify", "--out", str(run), "--resume", "--lora-rank", "8"])
    # The same flags as the run was started with (paths relative or not) are no change.
    main(["finetune", "classify", "--out", str(run), "--resume", "--lr", "3e-3",
          "--train", str(sentiment_file("train")), "--model", str(tiny_model_dir)])
    assert "already finished" in capsys.readouterr().err
    main(["finetune", "classify", "--out", str(run), "--resume", "--epochs", "3"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert [e["step"] for e in metrics["evals"]] == [20, 40, 60] and set(metrics["final"]) == {"dev", "test"}
    assert "epochs: 3" in (run / "config.yaml").read_text()


def test_reproduce_a_classification_run_from_its_card(lora_run, tmp_path):
    from llamaforge.provenance.modelcard import read_card
    from llamaforge.train.reproduce import reproduce
    card = read_card(lora_run)
    assert card["recipe"] == "classify" and card["metrics"]["test"]["n"] == 80
    result = reproduce(lora_run, tmp_path / "again")
    assert result["match"], (result["original"], result["reproduced"])

"""Pretraining from scratch and continued: tokenizer training, the token cache, learning, and a
model that transformers reads to the same logits."""
import json
from pathlib import Path

import pytest
import torch

from llamaforge.cli import main
from llamaforge.formats.load import load
from llamaforge.text.convert import from_hf_dir

from conftest import hf_model_from_dir, run_until_first_checkpoint, same_run_metrics

STORIES = Path(__file__).resolve().parent.parent / "llamaforge" / "datasets" / "stories"
MIXED = "Once upon a time, 羊驼 lived in Cusco 🦙.\n\tdef f(x): return x ** 2  # code\n\n  spaces   here"


def test_tokenizer_train_matches_transformers(tmp_path, capsys):
    from transformers import AutoTokenizer
    out = tmp_path / "tok"
    main(["tokenizer", "train", str(STORIES / "corpus.txt"), "--vocab", "600", "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    tok = from_hf_dir(out)
    assert tok.vocab_size == 600
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED                                      # byte-level: nothing is lost
    assert AutoTokenizer.from_pretrained(str(out)).encode(MIXED) == ids  # and transformers agrees
    assert tok.stop_ids == {tok.token_id("<|endoftext|>"), tok.token_id("<|im_end|>")}
    assert len(tok.encode("Once upon a time")) < len("Once upon a time") / 2   # it learned merges


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    cache = root / "cache"
    run = root / "run"
    env = pytest.MonkeyPatch()
    env.setenv("LLAMAFORGE_CACHE", str(cache))   # a cache of this module's own
    main(["pretrain", "--data", str(STORIES / "corpus.txt"), "--out", str(run), "--model-config", "tiny",
          "--vocab", "512", "--block-size", "64", "--batch-size", "16", "--max-steps", "60", "--eval-every", "20",
          "--warmup", "5", "--dtype", "fp32"])
    yield run, cache
    env.undo()


def test_pretraining_learns(pretrained, capsys):
    run, _ = pretrained
    metrics = json.loads((run / "metrics.json").read_text())
    losses = [e["loss"] for e in metrics["evals"]]
    assert len(losses) == 3
    assert losses[-1] < 5.5 and losses[-1] < losses[0] - 0.3, losses   # ln(512) = 6.24 is chance
    assert metrics["final"]["loss"] == min(losses)
    assert (run / "samples.log").read_text().count("=== val loss") == 3
    assert {"config.yaml", "tokenizer", "best", "checkpoint", "curves.png", "tensorboard"} <= {p.name for p in run.iterdir()}


def test_the_pretrained_model_loads_in_transformers(pretrained):
    run, _ = pretrained
    ours, tok = load(run, dtype="fp32")
    ids = torch.tensor([tok.encode("Once upon a time, a little llama")])
    with torch.no_grad():
        assert (ours(ids) - hf_model_from_dir(run / "best")(input_ids=ids).logits).abs().max() < 1e-4


def test_tokens_are_cached_and_continued_pretraining(pretrained, tmp_path, capsys):
    run, cache = pretrained
    assert len(list((cache / "tokens").glob("*.bin"))) == 1
    # Continue from the model just trained: same tokenizer, so the token file is reused.
    main(["pretrain", "--data", str(STORIES / "corpus.txt"), "--out", str(tmp_path / "more"), "--model", str(run),
          "--block-size", "64", "--max-steps", "10", "--eval-every", "10", "--dtype", "fp32", "--lr", "1e-3"])
    captured = capsys.readouterr()
    assert "tokens from the cache" in captured.err
    before = min(e["loss"] for e in json.loads((run / "metrics.json").read_text())["evals"])
    assert json.loads(captured.out)["loss"] < before   # it went on learning


def test_bad_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "nodocs").mkdir()
    for data, message in ((tmp_path / "empty.txt", "empty.txt: empty"), (tmp_path / "nodocs", "no text files"),
                          (tmp_path / "missing.txt", "no such file")):
        with pytest.raises(SystemExit):
            main(["pretrain", "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1"])
        assert message in capsys.readouterr().err


def test_pretraining_resumes_after_sigkill_to_the_same_losses(tmp_path):
    import os
    import subprocess
    import sys
    env = {**os.environ, "LLAMAFORGE_CACHE": str(tmp_path / "cache")}
    args = ["--data", str(STORIES / "corpus.txt"), "--model-config", "tiny", "--vocab", "512", "--block-size", "32",
            "--batch-size", "8", "--max-steps", "60", "--eval-every", "20", "--save-every", "7", "--dtype", "fp32"]
    cmd = [sys.executable, "-m", "llamaforge", "pretrain"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(cmd + args + ["--out", str(whole)], check=True, capture_output=True, env=env)
    step = run_until_first_checkpoint(cmd + args + ["--out", str(killed)], killed / "checkpoint", env)
    assert 0 < step < 60
    r = subprocess.run(cmd + ["--out", str(killed), "--resume"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, killed))
    same_run_metrics([e["loss"] for e in a["evals"]], [e["loss"] for e in b["evals"]], path="evals.loss")
    same_run_metrics(a["final"]["loss"], b["final"]["loss"], path="final.loss")

"""Run directories written by an earlier llamaforge still load and compute what they computed then.

`fixtures/runs_before_layout/` holds three small runs on the default model (a LoRA classifier, a
LoRA SFT run and a prefix-tuning run, each 3 steps) made by llamaforge at commit a334a39, before
the package was split into subpackages, and what that llamaforge printed for them in fp32
(`expected.json`): class probabilities from `predict`, perplexity from `evaluate --task`.
"""
import json
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "runs_before_layout"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture
def old_runs(tmp_path):
    """A copy, so that nothing a test does can change the fixture."""
    shutil.copytree(FIXTURES, tmp_path / "runs")
    return tmp_path / "runs"


def test_an_old_classifier_run_predicts_as_it_did(old_runs):
    from llamaforge.train.classify import predict_classifier
    expected = EXPECTED["classify_predict"]
    rows = predict_classifier(old_runs / "classify", texts=[r["text"] for r in expected], dtype="fp32")
    for ours, theirs in zip(rows, expected, strict=True):
        assert ours["label"] == theirs["label"]
        for key in ("p_negative", "p_positive"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-4), (ours["text"], key)


@pytest.mark.parametrize("run", ["sft", "prefix"])
def test_an_old_generative_run_scores_as_it_did(old_runs, run):
    from llamaforge.evaluate.scoring import evaluate_model
    scores = evaluate_model(str(old_runs / run), "perplexity", old_runs / "text.txt", dtype="fp32")
    expected = EXPECTED[f"{run}_perplexity"]
    assert scores["n"] == expected["n"]
    assert scores["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
